"""The OpenAI-compatible HTTP server: starlette routes on uvicorn's event loop, the engine core in a
process of its own (AsyncLLM over an EngineCoreClient; on a thread with engine_in_process),
tokenizing and chat templates in worker threads.

    client ──HTTP──> uvicorn event loop (main thread)
                       parse + validate (pydantic) ── 400/401/404/503 answered here
                       prepare: chat template, tokenize, check length ──> worker thread (to_thread)
                       AsyncLLM.generate ── AddRequest (ZMQ) ──> engine process: schedule, step, update
                       <── each step's token ids (Steps) -> output processing on
                           this loop (detokenize, stop strings) -> per-request asyncio.Queue
                       responses/stream chunks (jaxserve.api.responses) ──SSE──> client

The event loop moves small Python objects and JSON and turns token ids into text; the engine core
never touches an HTTP socket or a tokenizer.
A disconnected client cancels its handler, which aborts its engine requests (pages freed).

    settings.py  ServerSettings: what the entry points decide (no environment reads below them)
    app_factory.py  create_app(settings): routes, lifespan (engine built and shut down), error
                 shape (jaxserve/app.py, the uvicorn entry, calls it with settings from the environment)
    routes.py    the endpoints
    serving.py   Serving: admission (queue limit), prepare off the loop, merged streams, metrics hooks
    metrics.py   Prometheus metrics with vLLM's names under the jaxserve: prefix
    http.py      request body -> pydantic, SSE response, auth middleware, cancel on disconnect
"""

from jaxserve.server.app_factory import create_app
from jaxserve.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
