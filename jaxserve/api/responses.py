"""RequestOutputs -> OpenAI responses and stream chunks.

The engine sends cumulative RequestOutputs (all text and tokens so far), one stream per prompt;
choice k of a request is sample i of prompt p with k = p * n + i. A stream keeps, per choice, how
much it already sent and emits only the difference:

    out.outputs[i].text      "The capital of France is"     sent_chars = 10  -> delta "al of France is"
    out.outputs[i].token_ids [ ... 7 ids ... ]              sent_tokens = 3  -> logprobs of 4 tokens

With tools (tools.ToolPlan), a choice's text becomes content and tool_calls when it finishes
(finish_reason "tool_calls" if it made any); a stream sends as content only what can no longer
turn out to be a call, and the calls as OpenAI's tool_calls deltas at the end.

Logprobs name tokens by their own bytes (jaxserve.api.token_bytes) where the server has a
tokenizer, else by the engine's Logprob.decoded_token; nothing here decodes text.
"""

from __future__ import annotations

import codecs
import dataclasses
import time

from jaxserve.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    FunctionCall,
    FunctionCallDelta,
    PromptTokensDetails,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    UsageInfo,
)
from jaxserve.api.token_bytes import TokenBytes
from jaxserve.api.tools import ToolPlan, new_call_id
from jaxserve.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput


def _describe(token_id: int, lp: Logprob | None, vocab: TokenBytes | None) -> tuple[str, bytes | None]:
    """(token string, the token's own bytes or None where unknown)."""
    raw = vocab.bytes_of(token_id) if vocab is not None else None
    if raw is not None:
        return vocab.name(token_id), raw
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token, None
    return f"token_id:{token_id}", None


def _chosen(pos: PositionLogprobs, token_id: int) -> tuple[Logprob | None, float]:
    lp = pos.get(token_id)  # None cannot happen for a sampled token; it keeps a malformed entry from failing
    return lp, (float("nan") if lp is None else lp.logprob)


def completion_logprobs(
    token_ids: list[int],
    positions: list[PositionLogprobs | None],
    offset: int,
    token_strs: list[str] | None = None,
    vocab: TokenBytes | None = None,
) -> CompletionLogprobs:
    """Legacy completions logprobs. positions[j] is None for a prompt's first token (no logprob);
    token_strs then names the tokens (echoed prompts). text_offset counts the characters that the
    tokens' bytes complete, so a character split over tokens starts at the offset of its first."""
    out = CompletionLogprobs()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for j, (tid, pos) in enumerate(zip(token_ids, positions)):
        if pos is None:
            value, top = None, None
            text, raw = _describe(tid, None, vocab)
            if raw is None:
                text = token_strs[j] if token_strs else ""
        else:
            lp, value = _chosen(pos, tid)
            text, raw = _describe(tid, lp, vocab)
            top = {_describe(t, alt, vocab)[0]: alt.logprob for t, alt in pos.items()}
        out.text_offset.append(offset)
        out.token_logprobs.append(value)
        out.tokens.append(text)
        out.top_logprobs.append(top)
        offset += len(utf8.decode(raw)) if raw is not None else len(text)
    return out


def _top_logprob(token_id: int, lp: Logprob, vocab: TokenBytes | None) -> TopLogprob:
    text, raw = _describe(token_id, lp, vocab)
    return TopLogprob(token=text, logprob=lp.logprob, bytes=list(raw if raw is not None else text.encode()))


def chat_logprobs(
    token_ids: list[int], positions: list[PositionLogprobs], top_k: int, vocab: TokenBytes | None = None
) -> ChatLogprobs:
    content = []
    for tid, pos in zip(token_ids, positions):
        lp, value = _chosen(pos, tid)
        text, raw = _describe(tid, lp, vocab)
        ranked = sorted(
            ((t, alt) for t, alt in pos.items() if alt.rank is not None and alt.rank <= top_k), key=lambda x: x[1].rank
        )
        content.append(
            TokenLogprob(
                token=text,
                logprob=value,
                bytes=list(raw if raw is not None else text.encode()),
                top_logprobs=[_top_logprob(t, alt, vocab) for t, alt in ranked],
            )
        )
    return ChatLogprobs(content=content, refusal=None)


def usage_of(outputs: list[RequestOutput | None]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in outputs if o is not None)
    completion = sum(len(c.token_ids) for o in outputs if o is not None for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs if o is not None)
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


@dataclasses.dataclass
class _Sent:
    chars: int = 0
    tokens: int = 0
    started: bool = False
    done: bool = False


@dataclasses.dataclass
class EchoPrompt:
    """What echo prepends to a choice: the prompt's text, and for logprobs its tokens' strings."""

    text: str
    token_strs: list[str] | None = None


class CompletionBuilder:
    def __init__(
        self,
        request_id: str,
        model: str,
        n: int,
        num_prompts: int,
        *,
        logprobs: int | None = None,
        echo: list[EchoPrompt] | None = None,
        include_usage: bool = False,
        stream_each_token: bool = False,
        vocab: TokenBytes | None = None,
    ):
        """stream_each_token: a chunk for every new token even without new text (a model served
        without a tokenizer has no text until the end; clients still see tokens arrive).
        vocab: names logprobs' tokens by their bytes (None: by the engine's decoded strings)."""
        self.id, self.model, self.n, self.logprobs, self.echo = request_id, model, n, logprobs, echo
        self.vocab = vocab
        self.stream_each_token = stream_each_token
        self.created = int(time.time())
        self.include_usage = include_usage
        self._sent = [_Sent() for _ in range(n * num_prompts)]

    def _echo_logprobs(self, p: int, out: RequestOutput) -> CompletionLogprobs | None:
        if self.logprobs is None or not out.prompt_logprobs:
            return None
        return completion_logprobs(out.prompt_token_ids, out.prompt_logprobs, 0, self.echo[p].token_strs, self.vocab)

    def _choice(
        self, p: int, out: RequestOutput, c: CompletionOutput, start_chars: int, start_tokens: int, first: bool
    ) -> CompletionChoice:
        prefix = self.echo[p].text if (self.echo and first) else ""
        text = prefix + c.text[start_chars:]
        lp = None
        if self.logprobs is not None:
            base = len(self.echo[p].text) if self.echo else 0
            echo_lp = self._echo_logprobs(p, out) if (self.echo and first) else None
            offset = base + len(c.text[:start_chars])
            lp = completion_logprobs(
                c.token_ids[start_tokens:], (c.logprobs or [])[start_tokens:], offset, vocab=self.vocab
            )
            if echo_lp is not None:
                fields = CompletionLogprobs.model_fields
                lp = CompletionLogprobs(**{k: getattr(echo_lp, k) + getattr(lp, k) for k in fields})
        return CompletionChoice(
            index=p * self.n + c.index, text=text, logprobs=lp, finish_reason=c.finish_reason, stop_reason=c.stop_reason
        )

    def response(self, outputs: list[RequestOutput]) -> CompletionResponse:
        choices = [self._choice(p, out, c, 0, 0, True) for p, out in enumerate(outputs) for c in out.outputs]
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage_of(outputs)
        )

    def chunks(self, p: int, out: RequestOutput) -> list[CompletionChunk]:
        chunks = []
        for c in out.outputs:
            sent = self._sent[p * self.n + c.index]
            first = not sent.started
            # tokens whose text is still held back (a partial character, a possible stop string)
            # wait: their logprobs go out with the text that follows them
            new_token = self.stream_each_token and len(c.token_ids) > sent.tokens
            if sent.done or not (len(c.text) > sent.chars or new_token or c.finish_reason or (first and self.echo)):
                continue
            chunks.append(self._chunk([self._choice(p, out, c, sent.chars, sent.tokens, first)]))
            sent.chars, sent.tokens, sent.started = len(c.text), len(c.token_ids), True
            sent.done = c.finish_reason is not None
        return chunks

    def _chunk(self, choices, usage: UsageInfo | None = None) -> CompletionChunk:
        chunk = CompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices)
        if self.include_usage:
            chunk.usage = usage  # null on every chunk but the last, as OpenAI does
        return chunk

    def usage_chunk(self, outputs: list[RequestOutput | None]) -> CompletionChunk:
        return self._chunk([], usage_of(outputs))


class ChatBuilder:
    def __init__(
        self,
        request_id: str,
        model: str,
        n: int,
        *,
        top_logprobs: int | None = None,
        include_usage: bool = False,
        vocab: TokenBytes | None = None,
        tools: ToolPlan | None = None,
    ):
        self.id, self.model, self.n, self.top_logprobs, self.vocab = request_id, model, n, top_logprobs, vocab
        self.created = int(time.time())
        self.include_usage = include_usage
        self.tools = tools if tools is not None and tools.parses_calls else None
        self._sent = [_Sent() for _ in range(n)]

    def _message(self, c: CompletionOutput) -> tuple[AssistantMessage, str | None]:
        """The finished choice's message and finish reason (tool calls parsed out of its text)."""
        if self.tools is None or c.finish_reason is None:
            return AssistantMessage(content=c.text), c.finish_reason
        content, calls = self.tools.extract(c.text)
        if not calls:
            return AssistantMessage(content=content), c.finish_reason
        tool_calls = [
            ToolCall(id=new_call_id(), function=FunctionCall(name=call.name, arguments=call.arguments))
            for call in calls
        ]
        return AssistantMessage(content=content, tool_calls=tool_calls), "tool_calls"

    def _logprobs(self, c: CompletionOutput, start: int) -> ChatLogprobs | None:
        if self.top_logprobs is None:
            return None
        return chat_logprobs(c.token_ids[start:], (c.logprobs or [])[start:], self.top_logprobs, self.vocab)

    def response(self, out: RequestOutput) -> ChatCompletionResponse:
        choices = []
        for c in out.outputs:
            message, finish_reason = self._message(c)
            choices.append(
                ChatChoice(
                    index=c.index,
                    message=message,
                    logprobs=self._logprobs(c, 0),
                    finish_reason=finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage_of([out])
        )

    def role_chunks(self) -> list[ChatCompletionChunk]:
        """The first chunk of each choice names the role, as OpenAI's streams do."""
        return [
            self._chunk(
                [
                    ChatChunkChoice(
                        index=i, delta=DeltaMessage(role="assistant", content=""), logprobs=None, finish_reason=None
                    )
                ]
            )
            for i in range(self.n)
        ]

    def chunks(self, out: RequestOutput) -> list[ChatCompletionChunk]:
        if self.tools is not None:
            return self._tool_chunks(out)
        chunks = []
        for c in out.outputs:
            sent = self._sent[c.index]
            if sent.done or (len(c.text) <= sent.chars and c.finish_reason is None):
                continue
            delta = DeltaMessage(content=c.text[sent.chars :])
            choice = ChatChunkChoice(
                index=c.index, delta=delta, logprobs=self._logprobs(c, sent.tokens), finish_reason=c.finish_reason
            )
            if c.finish_reason is not None:
                choice.stop_reason = c.stop_reason
            sent.chars, sent.tokens, sent.done = len(c.text), len(c.token_ids), c.finish_reason is not None
            chunks.append(self._chunk([choice]))
        return chunks

    def _tool_chunks(self, out: RequestOutput) -> list[ChatCompletionChunk]:
        """Content up to where a call may begin; at the end, the rest of the content and the
        calls (each one delta carrying its id, name and whole arguments)."""
        chunks = []
        for c in out.outputs:
            sent = self._sent[c.index]
            if sent.done:
                continue
            if c.finish_reason is None:
                end = self.tools.content_end(c.text)
                if end > sent.chars:
                    delta = DeltaMessage(content=c.text[sent.chars : end])
                    chunks.append(self._chunk([ChatChunkChoice(index=c.index, delta=delta)]))
                    sent.chars = end
                continue
            message, finish_reason = self._message(c)
            content = message.content or ""
            streamed = c.text[: sent.chars].strip()  # the parsed content is stripped
            rest = content[len(streamed) :] if content.startswith(streamed) else ""
            if rest:
                chunks.append(self._chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(content=rest))]))
            if message.tool_calls:
                deltas = [
                    ToolCallDelta(
                        index=k,
                        id=call.id,
                        type="function",
                        function=FunctionCallDelta(name=call.function.name, arguments=call.function.arguments),
                    )
                    for k, call in enumerate(message.tool_calls)
                ]
                chunks.append(self._chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(tool_calls=deltas))]))
            final = ChatChunkChoice(
                index=c.index,
                delta=DeltaMessage(),
                logprobs=self._logprobs(c, sent.tokens),
                finish_reason=finish_reason,
                stop_reason=c.stop_reason,
            )
            chunks.append(self._chunk([final]))
            sent.chars, sent.tokens, sent.done = len(c.text), len(c.token_ids), True
        return chunks

    def _chunk(self, choices, usage: UsageInfo | None = None) -> ChatCompletionChunk:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices)
        if self.include_usage:
            chunk.usage = usage
        return chunk

    def usage_chunk(self, out: RequestOutput | None) -> ChatCompletionChunk:
        return self._chunk([], usage_of([out]))
