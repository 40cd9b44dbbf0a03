"""HTTP plumbing: request bodies into pydantic models, SSE responses, the API key, disconnects.

body stream -> at most max_bytes (413) -> strict JSON object (jaxserve.api.json_body) -> pydantic model
               a client gone mid-body: a quiet 400 nobody reads      (each failure: a 4xx in OpenAI's shape)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse

from jaxserve.api.errors import APIError, client_disconnected, from_validation_error, unauthorized
from jaxserve.api.json_body import body_too_large, parse_json_object

PARSE_IN_THREAD_BYTES = 1 << 16  # larger bodies are parsed off the event loop


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused (413) as soon as it is known to pass max_bytes: from Content-Length
    before reading anything, or while a chunked body arrives."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise body_too_large(max_bytes)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise body_too_large(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect:
        raise client_disconnected() from None
    return b"".join(chunks)


async def read_model[M: BaseModel](request: Request, model: type[M], max_bytes: int) -> M:
    body = await read_body(request, max_bytes)
    if len(body) > PARSE_IN_THREAD_BYTES:
        obj = await asyncio.to_thread(parse_json_object, body)
    else:
        obj = parse_json_object(body)
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise from_validation_error(e) from None


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def json_response(model: BaseModel) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"))


def sse_data(model: BaseModel | dict) -> str:
    text = model.model_dump_json() if isinstance(model, BaseModel) else json.dumps(model)
    return f"data: {text}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """Server-Sent Events whose generator is always closed, so that its cleanup (abort the engine
    requests) runs at once when the client leaves, not whenever the generator is collected;
    on_close runs even if the generator never started."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close=None):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def stream_response(self, send) -> None:
        try:
            async with contextlib.aclosing(self.body_iterator):
                await super().stream_response(send)
        finally:
            if self.on_close is not None:
                self.on_close()


async def until_disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body must have been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work):
    """Runs the coroutine `work`; if the client hangs up first, cancels it (its cleanup aborts the
    engine requests) and returns None."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if not task.done():
        await asyncio.gather(task, return_exceptions=True)  # let its cleanup run
    return None if task.cancelled() else task.result()


OPEN_PATHS = frozenset({"/health", "/metrics"})  # what load balancers and scrapers reach without a key


class APIKeyMiddleware:
    """When a key is set, every route but OPEN_PATHS needs "Authorization: Bearer <key>" (vLLM's
    --api-key guards /v1/*; here /tokenize, /detokenize and /version cost CPU or tell too)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if self.api_key and scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
                await error_response(unauthorized())(scope, receive, send)
                return
        await self.app(scope, receive, send)
