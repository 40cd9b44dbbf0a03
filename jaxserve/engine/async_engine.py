"""AsyncLLM: the engine core elsewhere (a thread of this process, or a process of its own), output
processing on the caller's event loop.

    event loop                                     engine core (EngineThread here, or
    generate(): prepare in a worker thread ──┐      EngineCoreClient -> core_process.py)
      output_processor.add, AddRequest ──────┼──> CoreLoop.apply: add / abort / finish stopped
                                             │    CoreLoop.turn: core.step() (schedule, launch,
                                             │                   wait, update)
    _on_steps: output_processor.process <────┼─── each step's EngineCoreOutputs
      (detokenize, stop strings, logprobs)   │
      -> per-request queues; stop strings ───┼──> FinishStopped
    cancelled / disconnected -> Abort ───────┘
    the core is gone (a dead engine process) -> every open stream fails at once (EngineCrashedError)

The core does no per-token Python beyond what the next step needs: detokenizing and building
RequestOutputs happen on the event loop, while the device runs. A step that raises is retried with
its requests isolated (recovery.py); only a request that fails alone gets the error. The messages
(messages.py) are the same typed structs whichever side of a process boundary the core is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from jaxserve.engine.core import EngineCoreOutput
from jaxserve.engine.core_loop import CoreLoop
from jaxserve.engine.llm_engine import Prompt
from jaxserve.engine.messages import Abort, AddRequest, EngineInput, FinishStopped, ResetPrefixCache
from jaxserve.engine.output_processor import OutputProcessor
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import sample_ids
from jaxserve.scheduler.request import check_request_id


class EngineDeadError(RuntimeError):
    """The engine is shut down (or gone): no new request is taken."""


class EngineCrashedError(RuntimeError):
    """The engine process died while this request was in flight."""


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class EngineCoreHandle(Protocol):
    """Where the engine core runs, as AsyncLLM reaches it. attach() starts delivering to it
    (AsyncLLM's deliver_* methods, from any thread); send() is called on the event loop."""

    def attach(self, frontend: AsyncLLM) -> None: ...

    def send(self, message: EngineInput) -> None: ...

    def is_alive(self) -> bool: ...

    def shutdown(self) -> None: ...


class AsyncLLM:
    def __init__(
        self,
        engine,
        on_step: Callable[[EngineCoreOutput], None] | None = None,
        *,
        core: EngineCoreHandle | None = None,
        on_dead: Callable[[BaseException], None] | None = None,
    ):
        """engine: an LLMEngine (its core then runs on a thread here) or what stands for one in
        the API process (core_client.RemoteEngine, with core= its EngineCoreClient): it prepares
        requests and names the tokenizer. on_step: called on the event loop with each step's output
        (per-step metrics). on_dead: called on the event loop once if the core dies."""
        self.engine = engine
        self._on_step, self._on_dead = on_step, on_dead
        self._outputs = OutputProcessor(engine.tokenizer)  # touched only on the event loop
        self._loop: asyncio.AbstractEventLoop | None = None
        with contextlib.suppress(RuntimeError):  # built on a loop (a server's lifespan): a death reaches it
            self._loop = asyncio.get_running_loop()  # even before the first request
        self._streams: dict[str, asyncio.Queue] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._call_ids = itertools.count()
        self._stopped = False
        self._dead: BaseException | None = None
        self._core = core if core is not None else EngineThread(engine.core)
        self._core.attach(self)

    async def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Streams cumulative RequestOutputs until finished. Bad input raises ValueError before
        anything is queued; leaving the iteration early (or being cancelled) aborts the request."""
        self._check_running()
        prepared = await asyncio.to_thread(self.engine.prepare, prompt, params)
        self._check_running()
        self._bind_loop()
        request_id = request_id or f"req-{next(self._ids)}"
        check_request_id(request_id)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = outputs
        ids = sample_ids(request_id, prepared.params.n)
        self._outputs.add(request_id, prepared.prompt, prepared.prompt_token_ids, prepared.params, ids)
        finished = False
        try:
            self._core.send(AddRequest(request_id, prepared.prompt_token_ids, prepared.params))
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
        if self._dead is None:
            self._core.send(Abort(request_id))

    async def reset_prefix_cache(self) -> int:
        """Forgets every cached KV page no request holds, in the engine core; returns how many."""
        self._check_running()
        self._bind_loop()
        call_id = next(self._call_ids)
        done = self._calls[call_id] = asyncio.get_running_loop().create_future()
        self._core.send(ResetPrefixCache(call_id))
        try:
            return await done
        finally:
            self._calls.pop(call_id, None)

    def shutdown(self) -> None:
        self._stopped = True
        self._core.shutdown()

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    @property
    def is_running(self) -> bool:
        """The engine core is alive (it survives step failures; only a crash or a shutdown ends it)."""
        return self._dead is None and self._core.is_alive()

    def _check_running(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is dead: {self._dead}")
        if self._stopped:
            raise EngineDeadError("the engine is shut down")

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._streams:
                raise RuntimeError("AsyncLLM serves one event loop at a time")
            self._loop = loop

    # -- from the engine core's side (any thread) -----------------------------------------------
    def deliver_steps(self, steps: list[EngineCoreOutput]) -> None:
        self._to_loop(self._on_steps, steps)

    def deliver_failure(self, request_ids: list[str], error: BaseException) -> None:
        self._to_loop(self._on_failure, request_ids, error)

    def deliver_reply(self, call_id: int, value: int) -> None:
        self._to_loop(self._on_reply, call_id, value)

    def engine_died(self, error: BaseException) -> None:
        self._dead = error  # new requests are refused from now on, whatever the loop is doing
        self._to_loop(self._on_engine_died, error)

    def _to_loop(self, fn, *args) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    # -- on the event loop ----------------------------------------------------------------------
    def _on_steps(self, steps: list[EngineCoreOutput]) -> None:
        for step in steps:
            if self._on_step is not None:
                self._on_step(step)
            emitted, stopped = self._outputs.process(step)
            for sample_id, stop in stopped:
                self._core.send(FinishStopped(sample_id, stop))
            for out in emitted:
                self._deliver(out.request_id, out)

    def _on_failure(self, request_ids: list[str], error: BaseException) -> None:
        for request_id in request_ids:
            self._outputs.drop(request_id)
            self._deliver(request_id, error)

    def _on_reply(self, call_id: int, value: int) -> None:
        future = self._calls.get(call_id)
        if future is not None:
            _resolve(future, value)

    def _on_engine_died(self, error: BaseException) -> None:
        """Every open stream and call fails now, with the same error."""
        for request_id in list(self._streams):
            self._outputs.drop(request_id)
            self._deliver(request_id, EngineCrashedError(str(error)))
        for future in self._calls.values():
            _fail(future, EngineDeadError(f"the engine is dead: {error}"))
        if self._on_dead is not None:
            self._on_dead(error)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(item)


class EngineThread:
    """The engine core on a thread of this process (the offline and debugging path): messages go
    in through a queue, results come back through the event loop's call_soon_threadsafe."""

    def __init__(self, core):
        self._core = core
        self._inputs: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
        self._frontend: AsyncLLM | None = None

    def attach(self, frontend: AsyncLLM) -> None:
        self._frontend = frontend
        self._thread.start()

    def send(self, message: EngineInput) -> None:
        self._inputs.put(message)
        self._wake.set()

    def is_alive(self) -> bool:
        return self._thread.is_alive()  # the loop survives step failures; a dead thread is a bug

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    # Sink of CoreLoop: results to the frontend
    def steps(self, outputs: list[EngineCoreOutput]) -> None:
        self._frontend.deliver_steps(outputs)

    def failed(self, request_ids: list[str], error: BaseException) -> None:
        self._frontend.deliver_failure(request_ids, error)

    def reply(self, call_id: int, value: int) -> None:
        self._frontend.deliver_reply(call_id, value)

    def _run(self) -> None:
        loop, core = CoreLoop(self._core, self), self._core
        while not self._stopped:
            while not self._inputs.empty():
                loop.apply(self._inputs.get())
            if not core.has_work():
                self._wake.wait()
                self._wake.clear()
                continue
            loop.turn()
