"""The engine core's serving loop, wherever it runs (a thread of the server, or a process of its own):

    EngineInput (messages.py) -> apply(): add / abort / finish a stopped sample / reset the prefix cache
    turn(): one EngineCore.step -> sink.steps(outputs)
            a step that raised -> sink.failed(the requests that failed, the error); the loop serves on

The caller owns the waiting (a queue and an event on a thread, a socket poll in a process); this
module only decides what each input and each step means.
"""

from __future__ import annotations

from typing import Protocol

from jaxserve.engine.core import EngineCore, EngineCoreOutput
from jaxserve.engine.messages import (
    Abort,
    AddRequest,
    EngineInput,
    EngineStats,
    FinishStopped,
    ResetPrefixCache,
    Shutdown,
)
from jaxserve.engine.recovery import StepFailed


class Sink(Protocol):
    """Where the loop's results go (all calls come from the loop's thread)."""

    def steps(self, outputs: list[EngineCoreOutput]) -> None: ...

    def failed(self, request_ids: list[str], error: BaseException) -> None: ...

    def reply(self, call_id: int, value: int) -> None: ...


class CoreLoop:
    def __init__(self, core: EngineCore, sink: Sink):
        self.core, self.sink = core, sink
        self.shutdown_requested = False

    def apply(self, message: EngineInput) -> None:
        core = self.core
        match message:
            case AddRequest(request_id, prompt_token_ids, params):
                try:
                    core.add_request(request_id, prompt_token_ids, params)
                except Exception as e:  # e.g. a duplicate id: that request fails alone
                    self.sink.failed([request_id], e)
            case Abort(request_id):
                core.abort(request_id)
            case FinishStopped(sample_id, stop):
                core.finish_stopped(sample_id, stop)
            case ResetPrefixCache(call_id):
                self.sink.reply(call_id, core.scheduler.reset_prefix_cache())
            case Shutdown():
                self.shutdown_requested = True
            case _:
                raise TypeError(f"not an engine input: {message!r}")

    def turn(self) -> None:
        """One step, if there is work; its outputs (or its failures) go to the sink."""
        core = self.core
        if not core.has_work():
            return
        try:
            outputs = core.step()
        except StepFailed as e:  # only the request that failed alone fails; the rest is retried
            self.sink.failed(e.failed, e.cause)
            return
        except Exception as e:  # an unexpected failure: the requests in flight fail; the engine serves on
            self.sink.failed(core.fail_all(e), e)
            return
        if outputs:
            self.sink.steps(outputs)


def engine_stats(core: EngineCore) -> EngineStats:
    """The engine state /metrics shows (read between steps, on the loop's thread)."""
    s = core.scheduler
    return EngineStats(
        num_requests_running=len(s.running),
        num_requests_waiting=len(s.waiting),
        kv_cache_usage=s.kv.usage,
        num_preemptions=s.num_preemptions,
        prefix_cache_queries=s.prefix_cache.queries,
        prefix_cache_hits=s.prefix_cache.hits,
    )
