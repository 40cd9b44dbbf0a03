"""AsyncLLM: the engine core on its own thread, output processing on the caller's event loop.

    event loop                                     engine thread
    generate(): prepare in a worker thread ──┐
      output_processor.add, ("add", ...) ────┼──> commands ─> core.add_request / abort / finish_stopped
                                             │    core.step() (schedule, launch, wait, update)
    _on_step: output_processor.process  <────┼─── call_soon_threadsafe(EngineCoreOutputs)
      (detokenize, stop strings, logprobs)   │
      -> per-request queues; stop strings ───┼──> ("stop", ...)
    cancelled / disconnected -> ("abort") ───┘

The engine thread does no per-token Python beyond what the next step needs: detokenizing and
building RequestOutputs happen on the event loop, while the device runs. A step that raises is
retried with its requests isolated (recovery.py); only a request that fails alone gets the error.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable

from jaxserve.engine.core import EngineCoreOutput
from jaxserve.engine.llm_engine import LLMEngine, Prompt
from jaxserve.engine.output_processor import OutputProcessor
from jaxserve.engine.recovery import StepFailed
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import sample_ids
from jaxserve.scheduler.request import check_request_id


class EngineDeadError(RuntimeError):
    pass


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


class AsyncLLM:
    def __init__(self, engine: LLMEngine, on_step: Callable[[EngineCoreOutput], None] | None = None):
        """on_step: called on the event loop with each step's output (per-step metrics)."""
        self.engine = engine
        self._on_step = on_step
        self._core = engine.core
        self._outputs = OutputProcessor(engine.tokenizer)  # touched only on the event loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._ids = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run_engine, name="jaxserve-engine", daemon=True)
        self._thread.start()

    async def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Streams cumulative RequestOutputs until finished. Bad input raises ValueError before
        anything is queued; leaving the iteration early (or being cancelled) aborts the request."""
        if self._stopped:
            raise EngineDeadError("the engine is shut down")
        prepared = await asyncio.to_thread(self.engine.prepare, prompt, params)
        self._bind_loop()
        request_id = request_id or f"req-{next(self._ids)}"
        check_request_id(request_id)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = outputs
        ids = sample_ids(request_id, prepared.params.n)
        self._outputs.add(request_id, prepared.prompt, prepared.prompt_token_ids, prepared.params, ids)
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
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Called on the event loop: the request ends now; its pages are freed within one step."""
        self._outputs.abort(request_id)
        self._send(("abort", request_id, None))

    async def reset_prefix_cache(self) -> int:
        """Forgets every cached KV page no request holds, on the engine thread; returns how many."""
        if self._stopped or not self.is_running:
            raise EngineDeadError("the engine is shut down")
        self._bind_loop()
        done = asyncio.get_running_loop().create_future()
        self._send(("reset_prefix_cache", None, done))
        return await done

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    @property
    def is_running(self) -> bool:
        """The engine thread is alive (it survives step failures; a dead thread is a bug)."""
        return self._thread.is_alive()

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._streams:
                raise RuntimeError("AsyncLLM serves one event loop at a time")
            self._loop = loop

    def _send(self, command) -> None:
        self._commands.put(command)
        self._wake.set()

    # -- on the event loop ----------------------------------------------------------------------
    def _on_steps(self, steps: list[EngineCoreOutput]) -> None:
        for step in steps:
            if self._on_step is not None:
                self._on_step(step)
            emitted, stopped = self._outputs.process(step)
            for sample_id, stop in stopped:
                self._send(("stop", sample_id, stop))
            for out in emitted:
                self._deliver(out.request_id, out)

    def _on_failure(self, request_ids: list[str], error: BaseException) -> None:
        for request_id in request_ids:
            self._outputs.drop(request_id)
            self._deliver(request_id, error)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(item)

    def _to_loop(self, fn, *args) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    # -- on the engine thread -------------------------------------------------------------------
    def _run_engine(self) -> None:
        core = self._core
        while not self._stopped:
            while not self._commands.empty():
                kind, request_id, payload = self._commands.get()
                if kind == "add":
                    try:
                        core.add_request(request_id, payload.prompt_token_ids, payload.params)
                    except Exception as e:  # e.g. a duplicate id: that request fails alone
                        self._to_loop(self._on_failure, [request_id], e)
                elif kind == "abort":
                    core.abort(request_id)
                elif kind == "reset_prefix_cache":
                    self._to_loop(_resolve, payload, core.scheduler.reset_prefix_cache())
                else:
                    core.finish_stopped(request_id, payload)
            if not core.has_work():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                steps = core.step()
            except StepFailed as e:  # only the request that failed alone fails; the rest is retried
                self._to_loop(self._on_failure, e.failed, e.cause)
                continue
            except Exception as e:  # an unexpected failure: the requests in flight fail; the engine serves on
                self._to_loop(self._on_failure, core.fail_all(e), e)
                continue
            if steps:
                self._to_loop(self._on_steps, steps)
