"""EngineCore: the step loop. One step, on one screen (step() below):

    schedule step n+1 -> launch it (queued behind step n on the device) -> wait for step n
    -> update the scheduler with its tokens -> hand its EngineCoreOutput to whoever emits

Requests come in as token ids (inputs.py made them) and leave as EngineCoreOutputs: plain data,
one per step, that the output processor (outputs.py) turns into RequestOutputs, on this thread
(LLMEngine) or another (AsyncLLM). Nothing here detokenizes.

Step n+1 is scheduled before step n's tokens are known: its decode tokens are read on the
device. A request that finishes in step n (eos, a stop string) has also run in step n+1: that
token is dropped. Requests under quarantine after a failure (recovery.py) run one step at a time,
so there the loop waits for each step before scheduling the next.

Structured outputs (structured_outputs.py): a grammar's mask for a request's next token needs
its previous one, which may be step n's token still on the device. So while a constrained
request is live, step n+1's model program is launched first (it reads that token on the device),
then step n is waited for and its tokens advance the matchers, and only then are step n+1's masks
computed and its sampler launched:

    (model n+1 launched by the previous step) -> wait for n -> update n, matchers accept n's
    tokens -> bitmask of n+1 -> launch sampler n+1 -> schedule n+2 -> launch model n+2

Model n+2 goes out right behind sampler n+1, inside the same engine step, so the device always has
a model program queued: it runs model n+2 while the host waits for sampler n+1, reads it back and
computes the masks of n+2. (Launching model n+2 in the next engine step instead left the device
idle while the host processed outputs and scheduled: 61% of the unconstrained throughput on an
H200.) A complete grammar ends its request (its tokens of later steps are dropped like any
finished request's).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from jaxserve.engine.recovery import StepFailed, fail_all, recover
from jaxserve.engine.runner import InFlightStep, ModelRunner, TokenLogprobs
from jaxserve.engine.structured_outputs import GrammarCompiler, Matchers
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import Request, RequestStatus, Scheduler
from jaxserve.scheduler.request import check_request_id


@dataclasses.dataclass(frozen=True, slots=True)
class EngineCoreOutput:
    """What one step produced: a token for each request that advanced, in step order."""

    request_ids: list[str]
    token_ids: list[int]
    finished: dict[str, tuple[str, int | str | None]]  # request id -> (finish reason, stop token id)
    logprobs: dict[str, TokenLogprobs]  # of the sampled tokens, for requests that asked
    prompt_logprobs: dict[str, list[tuple[int, TokenLogprobs]]]  # request id -> (position, logprobs)
    # user request id -> prompt tokens found in the prefix cache, for requests admitted since the
    # last output (before their first token)
    num_cached_tokens: dict[str, int] = dataclasses.field(default_factory=dict)
    # user request id -> when first admitted (time.perf_counter), for requests admitted since the
    # last output (before their first token): the end of their queue time
    scheduled_at: dict[str, float] = dataclasses.field(default_factory=dict)
    num_tokens: int = 0  # tokens the step computed (prompt chunks and decode inputs)
    timestamp: float = 0.0  # when its tokens were read back from the device (time.perf_counter)


@dataclasses.dataclass
class StepStats:
    num_tokens: int  # scheduled tokens
    bucket_tokens: int  # the compiled T they ran at
    host_seconds: float  # Python work for the step: schedule, stage, launch, read back, update (, output)
    schedule_seconds: float  # of which scheduling
    stage_seconds: float  # of which applying the SchedulerOutput, staging and launching
    launch_seconds: float  # of staging and launch, the compiled call alone (blocks if the runtime does)
    update_seconds: float  # of which reading back (past the wait) and updating the scheduler
    wait_seconds: float  # blocked on the device, waiting for its tokens
    step_seconds: float  # since the previous step's tokens were applied: the engine's period
    output_seconds: float = 0.0  # output processing, when it runs on the engine's thread (LLMEngine)


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    tokens: int = 0
    host_seconds: float = 0.0
    stage_seconds: float = 0.0
    wait_seconds: float = 0.0
    step_seconds: float = 0.0

    def add(self, s: StepStats) -> None:
        self.steps += 1
        self.tokens += s.num_tokens
        self.host_seconds += s.host_seconds
        self.stage_seconds += s.stage_seconds
        self.wait_seconds += s.wait_seconds
        self.step_seconds += s.step_seconds

    def summary(self) -> str:
        n = max(self.steps, 1)
        return (
            f"{self.steps} steps, {self.tokens} tokens: per step {1e3 * self.step_seconds / n:.2f} ms, host work "
            f"{1e3 * self.host_seconds / n:.2f} ms (staging and launch {1e3 * self.stage_seconds / n:.2f} ms; "
            f"overlapping the device's step), blocked on the device {1e3 * self.wait_seconds / n:.2f} ms"
        )


class EngineCore:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        *,
        eos_token_ids: frozenset[int],
        max_model_len: int,
        async_scheduling: bool = True,
        seed: int | None = None,
        grammars: GrammarCompiler | None = None,
        log: Callable = print,
    ):
        self.scheduler, self.runner = scheduler, runner
        self.eos_token_ids, self.max_model_len = eos_token_ids, max_model_len
        self.async_scheduling, self.log = async_scheduling, log
        self.stats = EngineStats()
        self.last_step: StepStats | None = None
        self._in_flight: InFlightStep | None = None
        self._ahead: InFlightStep | None = None  # constrained requests: the next step, its model launched
        self._unreported_seconds = 0.0  # host work of sampler launches, added to the next StepStats
        self._ready: list[EngineCoreOutput] = []  # outputs of a step finished before a later one failed
        self._rng = np.random.default_rng(seed)
        self._phase = (0.0, 0.0)  # (schedule, stage) seconds of the step launched last
        self._last_finish: float | None = None
        self.prefix_cache_log_interval = 10.0  # seconds between hit-rate lines while steps run
        self._prefix_cache_logged = (time.perf_counter(), 0, 0)  # (when, queries, hits)
        self.matchers = Matchers(grammars) if grammars is not None else None

    def reseed(self, seed: int) -> None:
        """Seeds the generator that draws a seed for each request that brings none (serving from
        several processes: every process draws the same, from process 0's seed)."""
        self._rng = np.random.default_rng(seed)

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> list[str]:
        """Queues a validated request; returns the ids of its samples (n > 1: one per sample)."""
        check_request_id(request_id)
        if self.scheduler.has_family(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else int(self._rng.integers(2**32))
        req = Request(request_id, prompt_token_ids, params, self.eos_token_ids, self.max_model_len, seed=seed % 2**32)
        spec = params.structured_outputs
        if spec is not None and self.matchers is None:
            raise ValueError("structured outputs need a tokenizer: this engine has none")
        matchers = [self.matchers.compiler.compile(spec)] if spec is not None else []  # raises before queueing
        sample_ids = self.scheduler.add_request(req)
        if matchers:
            self.matchers.add(sample_ids, spec, first=matchers[0])
        return sample_ids

    def abort(self, family_id: str) -> None:
        self.scheduler.abort(family_id)

    def finish_stopped(self, request_id: str, stop: str) -> None:
        """A stop string ended the request (found by the output processor)."""
        self.scheduler.finish(request_id, RequestStatus.FINISHED_STOPPED, stop_reason=stop)

    def has_work(self) -> bool:
        """Requests to run, a step in flight or undelivered outputs, or rows the runner must free."""
        s = self.scheduler
        return (
            s.has_unfinished
            or self._in_flight is not None
            or self._ahead is not None
            or bool(self._ready)
            or s.has_undelivered_removals
        )

    # -- one step -------------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        """schedule n+1 -> launch n+1 -> wait for n -> update n; returns step n's output (none
        on the first step, and two when a step in flight had to finish before one alone)."""
        outputs, self._ready = self._ready, []
        try:
            matchers = self.matchers
            if matchers:
                matchers.retain(self.scheduler.requests)
            launched, self._ahead = self._ahead, None
            if launched is None:
                if self.scheduler.has_quarantine or not self.async_scheduling:
                    outputs += self._finish_in_flight()
                # with constrained requests, the sampler waits for the masks (below)
                launched = self._schedule_and_launch(outputs, defer_sampler=bool(matchers))
            outputs += self._finish_in_flight(launched)
            if launched is not None and launched.pending_sampler is not None:
                self._launch_sampler(launched)
            self._in_flight = launched
            s = self.scheduler
            if matchers and s.has_unfinished and self.async_scheduling and not s.has_quarantine:
                self._ahead = self._schedule_and_launch(outputs, defer_sampler=True)  # model n+2, behind sampler n+1
            if not self.scheduler.has_unfinished:  # idle: settle what the last requests left behind
                outputs += self.settle()
        except BaseException:  # what was ready goes out with the next step
            self._ready = outputs
            raise
        return outputs

    def _schedule_and_launch(self, outputs: list, *, defer_sampler: bool) -> InFlightStep | None:
        """Schedules the next step and launches it (its model alone if defer_sampler). If the
        launch fails, nothing of it ran: the step in flight is finished (its output added to
        outputs) and StepFailed raised."""
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        t1 = time.perf_counter()
        try:
            launched = self.runner.execute(sched, defer_sampler=defer_sampler)
        except Exception as e:
            outputs += self._finish_in_flight()
            raise StepFailed(recover(self, sched, e, launched=False), e) from e
        self._phase = (t1 - t0, time.perf_counter() - t1)
        return launched

    def _finish_in_flight(self, launched: InFlightStep | None = None) -> list[EngineCoreOutput]:
        """Waits for the step in flight and applies its tokens. If it failed, the step launched
        behind it (which read its cache) is thrown away too."""
        if self._in_flight is None:
            return []
        step, self._in_flight = self._in_flight, None
        try:
            result = self.runner.read_back(step)
        except Exception as e:
            if launched is not None:  # it read the failed step's cache: let it end, it is rebuilt
                self.runner.wait_quietly(launched)
            raise StepFailed(recover(self, step.output, e, launched=True), e) from e
        t0 = time.perf_counter()
        out = step.output
        update = self.scheduler.update(out, result.tokens)
        ids, tokens = out.request_ids, result.tokens
        finished = update.finished
        if self.matchers:
            finished = self._finish_complete_grammars(self.matchers.accept(ids, tokens, update.advanced), finished)
        if len(update.advanced) < len(ids):  # not every grant got a token: keep those that did
            ids, tokens = [ids[i] for i in update.advanced], [tokens[i] for i in update.advanced]
        output = EngineCoreOutput(
            ids,
            tokens,
            finished,
            _without(result.logprobs, update.gone),
            _without(result.prompt_logprobs, update.gone),
            self.scheduler.take_num_cached_tokens(),
            self.scheduler.take_scheduled(),
            out.num_tokens,
            t0,
        )
        now = time.perf_counter()
        if now - self._prefix_cache_logged[0] >= self.prefix_cache_log_interval:
            self._log_prefix_cache(now)
        schedule_s, stage_s = self._phase
        stage_s, self._unreported_seconds = stage_s + self._unreported_seconds, 0.0
        update_s = result.host_seconds + (now - t0)
        self.last_step = StepStats(
            out.num_tokens,
            result.num_tokens,
            host_seconds=schedule_s + stage_s + update_s,
            schedule_seconds=schedule_s,
            stage_seconds=stage_s,
            launch_seconds=step.launch_seconds,
            update_seconds=update_s,
            wait_seconds=result.wait_seconds,
            step_seconds=now - (self._last_finish or now - result.wait_seconds),
        )
        self._last_finish = now
        self.stats.add(self.last_step)
        return [output]

    def _launch_sampler(self, launched: InFlightStep) -> None:
        """The masks of the step launched without its sampler (its matchers have seen every token
        before it now), then its sampler."""
        t0 = time.perf_counter()
        out = launched.output
        bitmask = self.matchers.bitmask(out.request_ids, out.samples)
        try:
            self.runner.launch_sampler(launched, bitmask)
        except Exception as e:  # its model program ran: the device state is rebuilt
            raise StepFailed(recover(self, out, e, launched=True), e) from e
        self._unreported_seconds += time.perf_counter() - t0

    def _finish_complete_grammars(self, done: list[str], finished: dict) -> dict:
        """Ends the requests whose grammar is complete ("stop"), unless the step ended them already."""
        for request_id in done:
            if request_id not in finished:
                self.scheduler.finish(request_id, RequestStatus.FINISHED_STOPPED)
                finished = {**finished, request_id: (RequestStatus.FINISHED_STOPPED.value, None)}
        return finished

    def _log_prefix_cache(self, now: float) -> None:
        """The prefix cache's hit rate since the last line (and overall), if it was queried."""
        stats = self.scheduler.prefix_cache
        _, queries, hits = self._prefix_cache_logged
        self._prefix_cache_logged = (now, stats.queries, stats.hits)
        if stats.queries > queries:
            self.log(
                f"prefix cache: hit rate {100 * (stats.hits - hits) / (stats.queries - queries):.1f}% of "
                f"{stats.queries - queries} prompt tokens looked up lately, "
                f"{100 * stats.hits / stats.queries:.1f}% since start"
            )

    def settle(self) -> list[EngineCoreOutput]:
        """Waits for the step in flight and, if no request is left, frees the rows of the
        finished ones (a SchedulerOutput that launches nothing)."""
        outputs = []
        if self._ahead is not None:  # a model launched ahead: its sampler goes out once n is in
            ahead, self._ahead = self._ahead, None
            outputs += self._finish_in_flight(ahead)
            self._launch_sampler(ahead)
            self._in_flight = ahead
        outputs += self._finish_in_flight()
        if not self.scheduler.has_unfinished and self.scheduler.has_undelivered_removals:
            self.runner.execute(self.scheduler.schedule())
        return outputs

    def fail_all(self, error: BaseException) -> list[str]:
        """After an unexpected failure: aborts every request (their cache may be lost) and
        rebuilds the device state; returns the aborted family ids. Outputs of steps that did
        finish still go out with the next step."""
        self._in_flight = self._ahead = None
        return fail_all(self, error)

    def forget_timing(self) -> None:
        """The next step's period starts afresh (after a failure, or an idle engine)."""
        self._last_finish = None


def _without(by_request: dict, gone: set[str]) -> dict:
    """What a step computed, less the requests that ended before it was read back (their id may
    already name a new request)."""
    return {k: v for k, v in by_request.items() if k not in gone} if gone and by_request else by_request
