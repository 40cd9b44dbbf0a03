"""The endpoints. Each handler: body -> pydantic -> checks (model, ranges: 400/404) -> Serving.open
(queue: 503; tokenize off the loop: 400) -> engine stream -> a whole response or SSE chunks.

    POST /v1/completions  /v1/chat/completions  /tokenize  /detokenize  /reset_prefix_cache
    GET  /v1/models  /v1/models/{id}  /health  /metrics  /version
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import jaxserve
from jaxserve.api.errors import APIError, bad_request, from_value_error, internal, model_not_found
from jaxserve.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from jaxserve.api.responses import ChatBuilder, CompletionBuilder, EchoPrompt
from jaxserve.api.tools import tool_plan
from jaxserve.api.translate import chat_params, chat_prompt, check_model, completion_params, completion_prompts
from jaxserve.engine.async_engine import EngineDeadError
from jaxserve.server.http import SSE_DONE, SSEResponse, cancel_on_disconnect, json_response, read_model, sse_data
from jaxserve.server.serving import OpenRequest

logger = logging.getLogger(__name__)


def _state(request: Request):
    return request.app.state.jaxserve


_unknown_fields_logged: set[str] = set()


async def _read[M](request: Request, model: type[M]) -> M:
    body = await read_model(request, model, _state(request).settings.max_request_body_bytes)
    for name in getattr(body, "model_extra", None) or ():  # ignored, as vLLM does, but said once
        if name not in _unknown_fields_logged:
            _unknown_fields_logged.add(name)
            logger.warning("ignoring the unknown request field %r (logged once per field name)", name)
    return body


def _engine_error(e: Exception) -> APIError:
    """An exception out of the engine stream: the request's own fault (400) or the engine's (500/503)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), type="server_error", code="engine_dead")
    if isinstance(e, ValueError):
        return from_value_error(e)
    logger.error("a request failed in the engine", exc_info=e)  # the server's fault: one traceback
    return internal(e)


async def _collect(req: OpenRequest) -> list:
    final = [None] * len(req.prepared)
    async for p, out in req.stream():
        final[p] = out
    return final


async def _respond(request: Request, req: OpenRequest, build) -> Response:
    """A whole (non-streaming) response; a client that hangs up meanwhile aborts its request."""
    try:
        outputs = await cancel_on_disconnect(request, _collect(req))
    except Exception as e:
        raise _engine_error(e) from e
    finally:
        req.close()
    if outputs is None:  # nobody is listening any more
        return Response(status_code=499)
    return json_response(build(outputs))


def _echo_prompts(tokenizer, req: OpenRequest, with_tokens: bool) -> list[EchoPrompt]:
    """What echo prepends: the prompt text (decoded when given as ids) and its tokens' strings."""
    echo = []
    for prep in req.prepared:
        text = prep.prompt if prep.prompt is not None else tokenizer.decode(prep.prompt_token_ids)
        tokens = [tokenizer.decode([t]) for t in prep.prompt_token_ids] if with_tokens else None
        echo.append(EchoPrompt(text, tokens))
    return echo


async def completions(request: Request) -> Response:
    arrival = time.perf_counter()
    body = await _read(request, CompletionRequest)
    st = _state(request)
    model = check_model(body.model, st.model_names)
    params = completion_params(body)
    prompts = completion_prompts(body)
    rid = f"cmpl-{uuid.uuid4().hex}"
    req = await st.serving.open(rid, prompts, params, arrival)
    try:
        echo = None
        if body.echo:
            if st.engine.tokenizer is None:
                raise bad_request("echo needs a tokenizer", param="echo")
            echo = await asyncio.to_thread(_echo_prompts, st.engine.tokenizer, req, body.logprobs is not None)
    except BaseException:
        req.close()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    builder = CompletionBuilder(
        rid,
        model,
        params.n,
        len(prompts),
        logprobs=body.logprobs,
        echo=echo,
        include_usage=include_usage,
        stream_each_token=st.engine.tokenizer is None,
        vocab=st.token_bytes,
    )
    if not body.stream:
        return await _respond(request, req, builder.response)

    async def events():
        final = [None] * len(prompts)
        try:
            async for p, out in req.stream():
                final[p] = out
                for chunk in builder.chunks(p, out):
                    yield sse_data(chunk)
            if include_usage:
                yield sse_data(builder.usage_chunk(final))
        except Exception as e:  # headers are gone: the error travels as an event
            yield sse_data(_engine_error(e).body())
        yield SSE_DONE

    return SSEResponse(events(), on_close=req.close)


async def chat_completions(request: Request) -> Response:
    arrival = time.perf_counter()
    body = await _read(request, ChatCompletionRequest)
    st = _state(request)
    model = check_model(body.model, st.model_names)
    tools = tool_plan(body, st.settings.tool_call_parser if st.settings.enable_auto_tool_choice else None)
    params = chat_params(body, tools)
    tokenizer = st.engine.tokenizer

    def render():  # the chat template and the tokenizer: run by Serving in a worker thread
        return chat_prompt(tokenizer, body.messages, body.add_generation_prompt, tools.offered if tools else None)

    rid = f"chatcmpl-{uuid.uuid4().hex}"
    req = await st.serving.open(rid, [render], params, arrival)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    builder = ChatBuilder(
        rid,
        model,
        params.n,
        top_logprobs=params.logprobs,
        include_usage=include_usage,
        vocab=st.token_bytes,
        tools=tools,
    )
    if not body.stream:
        return await _respond(request, req, lambda outs: builder.response(outs[0]))

    async def events():
        final = None
        for chunk in builder.role_chunks():
            yield sse_data(chunk)
        try:
            async for _, out in req.stream():
                final = out
                for chunk in builder.chunks(out):
                    yield sse_data(chunk)
            if include_usage:
                yield sse_data(builder.usage_chunk(final))
        except Exception as e:
            yield sse_data(_engine_error(e).body())
        yield SSE_DONE

    return SSEResponse(events(), on_close=req.close)


def _tokenizer_for(request: Request, model: str | None):
    """The app state and the tokenizer of the model a /tokenize or /detokenize body names."""
    st = _state(request)
    check_model(model, st.model_names)
    if st.engine.tokenizer is None:
        raise bad_request("this model has no tokenizer")
    return st, st.engine.tokenizer


async def tokenize(request: Request) -> Response:
    body = await _read(request, TokenizeRequest)
    st, tokenizer = _tokenizer_for(request, body.model)

    def work():
        if body.messages is not None:
            return chat_prompt(tokenizer, body.messages, body.add_generation_prompt)["prompt_token_ids"]
        return tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]

    ids = await asyncio.to_thread(work)
    return JSONResponse({"count": len(ids), "max_model_len": st.engine.max_model_len, "tokens": ids})


async def detokenize(request: Request) -> Response:
    body = await _read(request, DetokenizeRequest)
    st, tokenizer = _tokenizer_for(request, body.model)
    vocab = st.engine.vocab_size
    outside = [t for t in body.tokens if not 0 <= t < vocab]
    if outside:
        raise bad_request(f"token ids out of the vocabulary [0, {vocab}): {outside[:5]}", param="tokens")
    text = await asyncio.to_thread(tokenizer.decode, body.tokens)
    return JSONResponse({"prompt": text})


async def models(request: Request) -> Response:
    st = _state(request)
    cards = [
        ModelCard(id=name, root=st.settings.engine.model or name, max_model_len=st.engine.max_model_len)
        for name in st.model_names
    ]
    return json_response(ModelList(data=cards))


async def model_card(request: Request) -> Response:
    st = _state(request)
    name = request.path_params["model_id"]
    if name not in st.model_names:
        raise model_not_found(name)
    return json_response(
        ModelCard(id=name, root=st.settings.engine.model or name, max_model_len=st.engine.max_model_len)
    )


async def health(request: Request) -> Response:
    st = _state(request)
    if not st.engine_alive():
        return JSONResponse({"status": "engine stopped"}, status_code=503)
    return Response(status_code=200)


async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def reset_prefix_cache(request: Request) -> Response:
    """vLLM's: forgets the cached KV of earlier prompts (pages no request holds), then 200."""
    st = _state(request)
    try:
        forgotten = await st.llm.reset_prefix_cache()
    except EngineDeadError as e:
        raise _engine_error(e) from e
    logger.info("prefix cache reset: %d pages forgotten", forgotten)
    return Response(status_code=200)


async def version(request: Request) -> Response:
    return JSONResponse({"version": jaxserve.__version__})


ROUTES = [
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", model_card, methods=["GET"]),
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/detokenize", detokenize, methods=["POST"]),
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/version", version, methods=["GET"]),
    Route("/reset_prefix_cache", reset_prefix_cache, methods=["POST"]),
]
