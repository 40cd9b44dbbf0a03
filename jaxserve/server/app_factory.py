"""create_app(settings) -> a Starlette app whose lifespan builds the engine and shuts it down.

start-up:  LLMEngine (load, warm-up compile: minutes on a CPU) -> AsyncLLM (engine thread)
serving:   routes (jaxserve.server.routes) on the event loop
shut-down: uvicorn stops accepting, waits for requests in flight (SIGTERM), then the engine
           thread is stopped
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from jaxserve.api.errors import APIError, internal
from jaxserve.api.token_bytes import TokenBytes
from jaxserve.engine.async_engine import AsyncLLM
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.server.faults import inject_step_failure
from jaxserve.server.http import APIKeyMiddleware, error_response
from jaxserve.server.metrics import Metrics
from jaxserve.server.routes import ROUTES
from jaxserve.server.serving import Serving
from jaxserve.server.settings import ServerSettings


@dataclasses.dataclass
class ServerState:
    settings: ServerSettings
    engine: LLMEngine
    llm: AsyncLLM
    serving: Serving
    metrics: Metrics
    token_bytes: TokenBytes | None  # logprobs' token strings and bytes; None without a tokenizer

    @property
    def model_names(self) -> list[str]:
        return list(self.settings.model_names)

    def engine_alive(self) -> bool:
        return self.llm._thread.is_alive()  # AsyncLLM's loop survives step failures; a dead thread is a bug


async def on_api_error(request, e: APIError):
    return error_response(e)


async def on_http_error(request, e: HTTPException):
    """Starlette's own 404 and 405, in OpenAI's shape, keeping their headers (a 405's Allow)."""
    kind = "NotFoundError" if e.status_code == 404 else "invalid_request_error"
    return error_response(APIError(e.status_code, str(e.detail), type=kind, headers=dict(e.headers or {})))


async def on_unexpected(request, e: Exception):
    # Starlette re-raises after this answer: uvicorn logs the traceback, once
    return error_response(internal(e))


EXCEPTION_HANDLERS = {APIError: on_api_error, HTTPException: on_http_error, Exception: on_unexpected}


def create_app(settings: ServerSettings = ServerSettings(), *, engine: LLMEngine | None = None) -> Starlette:
    """engine: an engine built elsewhere (tests); by default the lifespan builds one from settings."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        built = engine or await asyncio.to_thread(LLMEngine, settings.engine)
        if settings.fault_token_id is not None:
            inject_step_failure(built, settings.fault_token_id)
        token_bytes = None if built.tokenizer is None else await asyncio.to_thread(TokenBytes, built.tokenizer)
        metrics = Metrics(built, settings.model_names[0])
        llm = AsyncLLM(built, on_step=metrics.step)
        serving = Serving(llm, settings, metrics)
        app.state.jaxserve = ServerState(settings, built, llm, serving, metrics, token_bytes)
        try:
            yield
        finally:
            llm.shutdown()

    return Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        middleware=[Middleware(APIKeyMiddleware, api_key=settings.api_key)],
        exception_handlers=EXCEPTION_HANDLERS,
    )
