"""RequestOutputs -> OpenAI responses and stream chunks.

The engine sends cumulative RequestOutputs (all text and tokens so far), one stream per prompt;
choice k of a request is sample i of prompt p with k = p * n + i. A stream keeps, per choice, how
much it already sent and emits only the difference:

    out.outputs[i].text      "The capital of France is"     sent_chars = 10  -> delta "al of France is"
    out.outputs[i].token_ids [ ... 7 ids ... ]              sent_tokens = 3  -> logprobs of 4 tokens

Token strings for logprobs come with the engine's Logprob.decoded_token; nothing here decodes.
"""

from __future__ import annotations

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
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)
from jaxserve.outputs import CompletionOutput, PositionLogprobs, RequestOutput


def _token_str(pos: PositionLogprobs, token_id: int) -> tuple[str, float]:
    lp = pos.get(token_id)
    if lp is None:  # cannot happen for a sampled token; keeps a malformed entry from failing a response
        return f"token_id:{token_id}", float("nan")
    return lp.decoded_token if lp.decoded_token is not None else f"token_id:{token_id}", lp.logprob


def completion_logprobs(
    token_ids: list[int], positions: list[PositionLogprobs | None], offset: int, token_strs: list[str] | None = None
) -> CompletionLogprobs:
    """Legacy completions logprobs. positions[j] is None for a prompt's first token (no logprob);
    token_strs then names the tokens (echoed prompts)."""
    out = CompletionLogprobs()
    for j, (tid, pos) in enumerate(zip(token_ids, positions)):
        if pos is None:
            text, value, top = (token_strs[j] if token_strs else ""), None, None
        else:
            text, value = _token_str(pos, tid)
            top = {(lp.decoded_token or f"token_id:{t}"): lp.logprob for t, lp in pos.items()}
        out.text_offset.append(offset)
        out.token_logprobs.append(value)
        out.tokens.append(text)
        out.top_logprobs.append(top)
        offset += len(text)
    return out


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], top_k: int) -> ChatLogprobs:
    content = []
    for tid, pos in zip(token_ids, positions):
        text, value = _token_str(pos, tid)
        ranked = sorted((lp for lp in pos.values() if lp.rank is not None and lp.rank <= top_k), key=lambda lp: lp.rank)
        top = [
            TopLogprob(token=lp.decoded_token or "", logprob=lp.logprob, bytes=list((lp.decoded_token or "").encode()))
            for lp in ranked
        ]
        content.append(TokenLogprob(token=text, logprob=value, bytes=list(text.encode()), top_logprobs=top))
    return ChatLogprobs(content=content, refusal=None)


def usage_of(outputs: list[RequestOutput | None]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in outputs if o is not None)
    completion = sum(len(c.token_ids) for o in outputs if o is not None for c in o.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


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
    ):
        """stream_each_token: a chunk for every new token even without new text (a model served
        without a tokenizer has no text until the end; clients still see tokens arrive)."""
        self.id, self.model, self.n, self.logprobs, self.echo = request_id, model, n, logprobs, echo
        self.stream_each_token = stream_each_token
        self.created = int(time.time())
        self.include_usage = include_usage
        self._sent = [_Sent() for _ in range(n * num_prompts)]

    def _echo_logprobs(self, p: int, out: RequestOutput) -> CompletionLogprobs | None:
        if self.logprobs is None or not out.prompt_logprobs:
            return None
        return completion_logprobs(out.prompt_token_ids, out.prompt_logprobs, 0, self.echo[p].token_strs)

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
            lp = completion_logprobs(c.token_ids[start_tokens:], (c.logprobs or [])[start_tokens:], offset)
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
        self, request_id: str, model: str, n: int, *, top_logprobs: int | None = None, include_usage: bool = False
    ):
        self.id, self.model, self.n, self.top_logprobs = request_id, model, n, top_logprobs
        self.created = int(time.time())
        self.include_usage = include_usage
        self._sent = [_Sent() for _ in range(n)]

    def _logprobs(self, c: CompletionOutput, start: int) -> ChatLogprobs | None:
        if self.top_logprobs is None:
            return None
        return chat_logprobs(c.token_ids[start:], (c.logprobs or [])[start:], self.top_logprobs)

    def response(self, out: RequestOutput) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                logprobs=self._logprobs(c, 0),
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for c in out.outputs
        ]
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

    def _chunk(self, choices, usage: UsageInfo | None = None) -> ChatCompletionChunk:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices)
        if self.include_usage:
            chunk.usage = usage
        return chunk

    def usage_chunk(self, out: RequestOutput | None) -> ChatCompletionChunk:
        return self._chunk([], usage_of([out]))
