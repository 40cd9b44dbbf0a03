"""HTTP plumbing: request bodies into pydantic models, SSE responses, the API key, disconnects.

body bytes -> UTF-8? -> JSON object? -> pydantic model      (each failure: a 400 in OpenAI's shape)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from jaxserve.api.errors import APIError, bad_request, from_validation_error, unauthorized


async def read_model[M: BaseModel](request: Request, model: type[M]) -> M:
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise bad_request("the request body must be a JSON object")
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


class APIKeyMiddleware:
    """When a key is set, /v1/* requests need "Authorization: Bearer <key>" (vLLM's --api-key)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if self.api_key and scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                await error_response(unauthorized())(scope, receive, send)
                return
        await self.app(scope, receive, send)
