"""AsyncLLM: the engine on its own thread, for asyncio callers (the HTTP server).

    caller (event loop)                          engine thread
    generate(): tokenize + validate in a worker ─┐
                thread, then ("add", ...) ───────┼─> commands ─> add_prepared / abort_request
    async for out in generate(...)  <────────────┼── call_soon_threadsafe(queue.put_nowait) <─ step()
    cancelled / disconnected -> ("abort", id) ───┘

The event loop never waits on the model, and the engine loop never waits on a client: outputs
are handed over through per-request asyncio queues. A step that raises is retried with its
requests isolated (LLMEngine._recover); only a request that fails alone gets the error.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator

from jaxserve.engine.llm_engine import LLMEngine, Prompt, StepFailed
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    pass


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="jaxserve-engine", daemon=True)
        self._thread.start()

    async def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Streams cumulative RequestOutputs until finished. Bad input raises ValueError before
        anything is queued; leaving the iteration early (or being cancelled) aborts the request."""
        if self._stopped:
            raise EngineDeadError("the engine is shut down")
        prepared = await asyncio.to_thread(self.engine.prepare, prompt, params)
        request_id = request_id or f"req-{next(self._ids)}"
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        self._send(("add", request_id, prepared))
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send(("abort", request_id, None))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id, None))

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def _send(self, command) -> None:
        self._commands.put(command)
        self._wake.set()

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            loop.call_soon_threadsafe(outputs.put_nowait, item)

    def _loop(self) -> None:
        engine = self.engine
        while not self._stopped:
            while not self._commands.empty():
                kind, request_id, payload = self._commands.get()
                if kind == "add":
                    try:
                        engine.add_prepared(request_id, payload)
                    except Exception as e:  # e.g. a duplicate id: that request fails alone
                        self._deliver(request_id, e)
                else:
                    engine.abort_request(request_id)
            if not engine.has_unfinished_requests():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except StepFailed as e:  # only the request that failed alone fails; the rest is retried
                for request_id in e.failed:
                    self._deliver(request_id, e.cause)
                continue
            except Exception as e:  # an unexpected failure: the requests in flight fail; the engine serves on
                for request_id in engine.fail_running(e):
                    self._deliver(request_id, e)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
