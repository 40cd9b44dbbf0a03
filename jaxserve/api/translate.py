"""Requests -> what the engine takes: SamplingParams and prompts (text or token ids).

    CompletionRequest.prompt: "text" | [ids] | ["text", ...] | [[ids], ...] -> one engine prompt each
    ChatCompletionRequest.messages -> chat template -> token ids (chat_prompt; CPU work, so the
                                      server runs it off the event loop)

Range checks live in SamplingParams (its ValueError becomes a 400); this module only maps names.
"""

from __future__ import annotations

from jaxserve.api.errors import bad_request, from_value_error, model_not_found
from jaxserve.api.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from jaxserve.api.structured import structured_spec
from jaxserve.api.tools import ToolPlan, with_tools_in_text
from jaxserve.sampling_params import SamplingParams, StructuredOutputsParams


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("`prompt` must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if any(isinstance(p, list) and not p for p in prompt):
        raise bad_request("a token-id prompt must not be empty", param="prompt")
    return list(prompt)


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if bias is None:
        return None
    try:
        return {int(k): v for k, v in bias.items()}
    except ValueError:
        raise bad_request("logit_bias keys must be token ids (integers as strings)", param="logit_bias") from None


def _params(
    req,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    grammar: StructuredOutputsParams | None = None,
) -> SamplingParams:
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request(
            f"best_of ({req.best_of}) other than n ({req.n}) is not supported: ask for n samples instead",
            param="best_of",
        )
    spec = structured_spec(req)
    if spec is not None and grammar is not None:
        raise bad_request("a forced tool choice already constrains the reply: drop the response format", param="tools")
    try:
        return SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k in (None, 0) else req.top_k,  # vLLM takes 0 as "no limit" too
            min_p=0.0 if req.min_p is None else req.min_p,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=_logit_bias(req.logit_bias),
            seed=req.seed,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            cache_salt=req.cache_salt,
            structured_outputs=grammar or spec,
        )
    except ValueError as e:
        raise from_value_error(e) from None


def completion_params(req: CompletionRequest) -> SamplingParams:
    if req.suffix is not None:
        raise bad_request("suffix is not supported (no fill-in-the-middle)", param="suffix")
    # echo with logprobs reports the prompt's logprobs too, as OpenAI's legacy endpoint did
    return _params(
        req,
        max_tokens=req.max_tokens,
        logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None,
    )


def chat_params(req: ChatCompletionRequest, tools: ToolPlan | None = None) -> SamplingParams:
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return _params(req, max_tokens=max_tokens, logprobs=logprobs, grammar=tools.grammar() if tools else None)


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template expects them: content as one string (text parts joined)."""
    out = []
    for m in messages:
        d = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            d["content"] = "\n".join(part.text for part in m.content)
        d.setdefault("content", "")
        out.append(d)
    return out


def chat_prompt(
    tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True, tools: list[dict] | None = None
) -> dict:
    """The engine prompt of a conversation: {"prompt": rendered text, "prompt_token_ids": ids}.
    tools: offered to the template (one that does not know tools gets them in a system message)."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if not template:
        raise bad_request("this model's tokenizer has no chat template: use /v1/completions", param="messages")
    rendered = template_messages(messages)
    extra = {}
    if "tools" in template:
        extra["tools"] = tools
    elif tools or any(m.get("tool_calls") for m in rendered):
        rendered = with_tools_in_text(rendered, tools)
    try:
        text = tokenizer.apply_chat_template(
            rendered, add_generation_prompt=add_generation_prompt, tokenize=False, **extra
        )
    except Exception as e:  # a template may refuse a conversation (roles out of order ...)
        raise bad_request(f"the chat template refused these messages: {e}", param="messages") from None
    return {"prompt": text, "prompt_token_ids": tokenizer(text, add_special_tokens=False)["input_ids"]}


def check_model(requested: str | None, served: list[str]) -> str:
    """The name to report: the requested one if served (absent: the first served name)."""
    if requested is None:
        return served[0]
    if requested not in served:
        raise model_not_found(requested)
    return requested
