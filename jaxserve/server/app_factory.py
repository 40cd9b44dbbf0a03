"""create_app(settings) -> a Starlette app whose lifespan starts the engine and shuts it down.

start-up:  the engine process (core_process.py: load, warm-up compile: minutes on a CPU), then
           AsyncLLM over its EngineCoreClient; or, with settings.engine_in_process (or an engine
           given, in tests), LLMEngine here and AsyncLLM with the core on a thread. With
           settings.distributed (several processes), the engine process is process 0 of them
serving:   routes (jaxserve.server.routes) on the event loop
shut-down: uvicorn stops accepting, waits for requests in flight (SIGTERM), then the engine
           process (or thread) is stopped
engine death: the streams in flight have failed (AsyncLLM), /health answers 503; the server stops
           itself (SIGTERM to its own process: uvicorn's graceful stop) and exits with status 1,
           for a supervisor to restart it
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from jaxserve.api.errors import APIError, internal
from jaxserve.api.token_bytes import TokenBytes
from jaxserve.engine.async_engine import AsyncLLM
from jaxserve.engine.core_client import EngineCoreClient, RemoteEngine
from jaxserve.engine.faults import inject_step_failure
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.server.http import APIKeyMiddleware, error_response
from jaxserve.server.metrics import Metrics
from jaxserve.server.routes import ROUTES
from jaxserve.server.serving import Serving
from jaxserve.server.settings import ServerSettings

logger = logging.getLogger(__name__)
ENGINE_DEATH_GRACE_S = 1.0


@dataclasses.dataclass
class ServerState:
    settings: ServerSettings
    engine: LLMEngine | RemoteEngine
    llm: AsyncLLM
    serving: Serving
    metrics: Metrics
    token_bytes: TokenBytes | None  # logprobs' token strings and bytes; None without a tokenizer

    @property
    def model_names(self) -> list[str]:
        return list(self.settings.model_names)

    def engine_alive(self) -> bool:
        return self.llm.is_running


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
        died: list[BaseException] = []

        def on_dead(error: BaseException) -> None:
            logger.error("the engine died (%s): open requests failed; stopping the server", error)
            died.append(error)
            # a moment for the error events to reach the clients and for a load balancer to see
            # /health 503, then uvicorn's graceful stop
            asyncio.get_running_loop().call_later(ENGINE_DEATH_GRACE_S, os.kill, os.getpid(), signal.SIGTERM)

        if engine is not None or settings.engine_in_process:
            built = engine or await asyncio.to_thread(LLMEngine, settings.engine)
            if settings.fault_token_id is not None:
                inject_step_failure(built, settings.fault_token_id)
            core = None
        else:
            core = EngineCoreClient(
                settings.engine, fault_token_id=settings.fault_token_id, distributed=settings.distributed
            )
            try:
                built = await core.start()
            except BaseException:
                core.shutdown()
                raise
        token_bytes = None if built.tokenizer is None else await asyncio.to_thread(TokenBytes, built.tokenizer)
        metrics = Metrics(built, settings.model_names[0])
        llm = AsyncLLM(built, on_step=metrics.step, core=core, on_dead=on_dead)
        serving = Serving(llm, settings, metrics)
        app.state.jaxserve = ServerState(settings, built, llm, serving, metrics, token_bytes)
        try:
            yield
        finally:
            llm.shutdown()
            if died:  # exit non-zero whichever entry point runs us, for a supervisor to restart the server
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)

    return Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        middleware=[Middleware(APIKeyMiddleware, api_key=settings.api_key)],
        exception_handlers=EXCEPTION_HANDLERS,
    )
