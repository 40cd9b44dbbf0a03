"""LLMEngine: the step-level engine. One step fits on one screen:

    schedule (scheduler: who gets how many tokens) -> execute (runner: one compiled step)
    -> update (scheduler: append tokens, finish, free pages) -> emit (detokenize, RequestOutputs)

Requests are validated and tokenized in add_request, before anything is queued.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from jaxserve.config import EngineConfig
from jaxserve.default_model import default_cache_dir
from jaxserve.engine import compile_counter
from jaxserve.engine.buckets import BucketPlan
from jaxserve.engine.detokenizer import IncrementalDetokenizer
from jaxserve.engine.executable_cache import ExecutableCache
from jaxserve.engine.runner import MAX_EOS_IDS, ModelRunner, StepResult, TokenLogprobs
from jaxserve.engine.setup import build_model_and_tokenizer, plan_kv_cache, step_workspace
from jaxserve.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import KVPageManager, Request, RequestStatus, Scheduler, SchedulerConfig

Prompt = str | list[int] | dict


class StepFailed(RuntimeError):
    """A step raised. `failed` holds the request ids given up on (each failed again while running
    alone); every other request of that step is recomputed, its family first tried alone."""

    def __init__(self, failed: list[str], cause: BaseException):
        super().__init__(f"step failed ({type(cause).__name__}: {cause}); failed requests: {failed}")
        self.failed = failed
        self.cause = cause


class PreparedRequest(NamedTuple):
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclasses.dataclass
class _Family:
    """One user request: its n samples and what they have produced so far."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[Request]
    detoks: list[IncrementalDetokenizer | None]
    logprobs: list[list[PositionLogprobs]] | None
    cumulative: list[float]
    prompt_logprobs: list[PositionLogprobs | None] | None


@dataclasses.dataclass
class StepStats:
    num_tokens: int  # scheduled tokens
    bucket_tokens: int  # the compiled T they ran at
    host_seconds: float  # Python work for the step: schedule, stage, launch, unpack, update, emit
    stage_seconds: float  # of which staging (numpy) and launching (jit dispatch)
    wait_seconds: float  # blocked on the device, waiting for its tokens
    launch_seconds: float  # of staging and launch, the compiled call alone (blocks if the runtime does)
    step_seconds: float  # since the previous step's tokens were applied: the engine's period


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
            f"{1e3 * self.host_seconds / n:.2f} ms (staging and launch {1e3 * self.stage_seconds / n:.2f} ms; overlapping "
            f"the device's step), blocked on the device "
            f"{1e3 * self.wait_seconds / n:.2f} ms"
        )


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig = EngineConfig(),
        *,
        model=None,
        tokenizer=None,
        logits_processors: dict[str, Callable] | None = None,
        progress: bool = True,
        log: Callable = print,
    ):
        self.config = config
        self.log = log
        t0 = time.perf_counter()
        model, self.tokenizer = build_model_and_tokenizer(config, model, tokenizer, progress=progress)
        log(f"model and tokenizer ready in {time.perf_counter() - t0:.1f} s")
        self.model_config = cfg = model.config
        self.plan = BucketPlan.make(
            config.max_num_batched_tokens, config.max_num_seqs, config.min_token_bucket, config.row_bucket_growth
        )
        log(self.plan.describe())
        processors = list((logits_processors or {}).items())
        workspace, t0 = 0, time.perf_counter()
        if config.num_kv_pages is None and "bytes_limit" in (jax.local_devices()[0].memory_stats() or {}):

            def measure() -> int:
                probe = ModelRunner(
                    model,
                    num_pages=4,
                    page_size=config.page_size,
                    max_model_len=config.page_size,
                    plan=self.plan,
                    max_num_seqs=config.max_num_seqs,
                    processors=processors,
                )
                return probe.step_workspace_bytes() + probe.state_bytes()

            workspace = step_workspace(config, model, self.plan.shapes, [n for n, _ in processors], measure)
            log(f"step workspace {workspace / 2**30:.2f} GiB ({time.perf_counter() - t0:.1f} s)")
        self.max_model_len, num_pages = plan_kv_cache(config, model, workspace_bytes=workspace, log=log)
        self.runner = ModelRunner(
            model,
            num_pages=num_pages,
            page_size=config.page_size,
            max_model_len=self.max_model_len,
            plan=self.plan,
            max_num_seqs=config.max_num_seqs,
            processors=processors,
        )
        use_cache = config.executable_cache if config.executable_cache is not None else jax.default_backend() == "gpu"
        cache = None
        # Not with logits processors (their code is not part of the key), and not yet on a mesh
        # (reloading onto several devices is untested).
        if use_cache and not processors and self.runner.mesh is None:
            cache = ExecutableCache(
                Path(config.cache_dir or default_cache_dir()) / "executables",
                self.runner.devices,
                *self.runner.executable_cache_key(),
            )
        took = self.runner.warm_up(progress=progress, cache=cache)
        log(
            f"warm-up compiled {len(self.plan.shapes)} step shapes in {took.total:.1f} s ({took.cached_programs} "
            f"programs from the executable cache; lowering {took.lower:.1f} s, compiling or loading "
            f"{took.compile:.1f} s, first runs {took.run:.1f} s)"
        )
        self.compilations_after_warmup = compile_counter.compilations()
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len),
            KVPageManager(num_pages, config.page_size),
        )
        eos = set(cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(sorted(eos)[:MAX_EOS_IDS])
        self._families: dict[str, _Family] = {}
        self._pending_outputs: list[RequestOutput] = []
        self._in_flight = None  # (SchedulerOutput, InFlightStep) of the step launched last
        self._launch_seconds = 0.0
        self._last_finish: float | None = None
        self.stats = EngineStats()
        self._rng = np.random.default_rng(config.seed)
        self._next_id = 0
        self.last_step: StepStats | None = None

    # -- requests in ----------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: Prompt, params: SamplingParams | None = None) -> str:
        """Validates, tokenizes and queues a request; returns its id. Raises ValueError on bad input."""
        return self.add_prepared(request_id, self.prepare(prompt, params))

    def prepare(self, prompt: Prompt, params: SamplingParams | None = None) -> PreparedRequest:
        """Tokenizes and validates without touching engine state: safe to call from any thread."""
        params = params or SamplingParams()
        text, ids = self._tokenize(prompt)
        self._validate(ids, params)
        return PreparedRequest(text, ids, params)

    def add_prepared(self, request_id: str | None, prepared: PreparedRequest) -> str:
        text, ids, params = prepared
        if request_id is None:
            request_id, self._next_id = str(self._next_id), self._next_id + 1
        if request_id in self._families:
            raise ValueError(f"request id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else int(self._rng.integers(2**32))
        req = Request(request_id, ids, params, self.eos_token_ids, self.max_model_len, seed=seed % 2**32)
        children = self.scheduler.add_request(req)
        for child in children:
            child.seed = (seed + child.index * 0x9E3779B9) % 2**32
        make_detok = lambda: (  # noqa: E731
            None
            if self.tokenizer is None
            else IncrementalDetokenizer(
                self.tokenizer,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop=params.include_stop_str_in_output,
            )
        )
        self._families[request_id] = _Family(
            request_id,
            text,
            ids,
            params,
            children,
            [make_detok() for _ in children],
            [[] for _ in children] if params.logprobs is not None else None,
            [0.0] * len(children),
            [None] * len(ids) if params.prompt_logprobs is not None else None,
        )
        return request_id

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: give prompts as token ids")
            return prompt, self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            return None, [int(t) for t in prompt]
        raise ValueError(
            f"a prompt is a string, a list of token ids or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}"
        )

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        vocab = self.model_config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of the vocabulary [0, {vocab}): {bad[:5]}")
        wanted = len(ids) + (params.max_tokens if params.max_tokens is not None else 1)
        if wanted > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{wanted} tokens ({len(ids)} in the prompt, {wanted - len(ids)} for the completion)."
            )
        for name, toks in (("logit_bias", params.logit_bias.keys()), ("stop_token_ids", params.stop_token_ids)):
            outside = [t for t in toks if not 0 <= t < vocab]
            if outside:
                raise ValueError(f"{name} token ids out of the vocabulary [0, {vocab}): {outside[:5]}")
        unknown = set(params.logits_processors) - set(self.runner.processor_names)
        if unknown:
            raise ValueError(f"unknown logits processors {sorted(unknown)}; registered: {self.runner.processor_names}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")

    def abort_request(self, request_id: str) -> None:
        family = self._families.pop(request_id, None)
        if family is None:
            return
        self.scheduler.abort(request_id)
        self._release_removed()
        self._pending_outputs.append(self._output(family))

    def _release_removed(self) -> None:
        """Frees the device rows (slots) of the requests the scheduler let go."""
        for request_id in self.scheduler.take_removed():
            self.runner.release(request_id)

    # -- one step ---------------------------------------------------------------------------------
    def step(self, only_finished: bool = False) -> list[RequestOutput]:
        """One engine step, with async scheduling so that the host works while the device does:

            schedule n+1 -> launch n+1 (queued behind n on the device) -> wait for n -> update n
            (tokens appended, finished requests freed) -> emit n (detokenize, stop strings, outputs)

        Step n+1 is scheduled before step n's tokens are known: its decode tokens are read on the
        device. Outputs trail the device by one step. A request that finishes in step n (eos, a
        stop string) has also run in step n+1: that token is dropped. Requests under quarantine
        after a failure run one step at a time. only_finished: return just the requests that
        finished (offline callers), skipping the snapshots of the others."""
        t0 = time.perf_counter()
        outputs, self._pending_outputs = self._pending_outputs, []
        try:
            if self.scheduler.quarantine or not self.config.async_scheduling:
                outputs += self._finish_in_flight(only_finished)
            sched = self.scheduler.schedule()
            for req in sched.preempted:
                self.runner.release(req.request_id)
            try:
                launched = (sched, self.runner.dispatch(sched)) if sched.chunks else None
            except Exception as e:  # nothing of it ran; the step in flight still counts
                outputs += self._finish_in_flight(only_finished, (sched, None))
                raise StepFailed(self._recover(sched, [], e, launched=False), e) from e
            self._launch_seconds = time.perf_counter() - t0
            outputs += self._finish_in_flight(only_finished, launched)
        except BaseException:  # what was ready goes out with the next step
            self._pending_outputs = outputs
            raise
        self._in_flight = launched
        return outputs

    def _finish_in_flight(self, only_finished: bool, launched=None) -> list[RequestOutput]:
        """Waits for the step in flight, applies its tokens and emits its outputs. If it failed,
        the step launched behind it (which read its cache) is thrown away too."""
        if self._in_flight is None:
            return []
        (sched, in_flight), self._in_flight = self._in_flight, None
        try:
            result = in_flight.result()
        except Exception as e:
            lost = []
            if launched is not None:
                lost = [launched[0]]
                try:  # let it end before anything is rebuilt
                    if launched[1] is not None:
                        jax.block_until_ready(launched[1].sampled)
                except Exception:
                    pass
            raise StepFailed(self._recover(sched, lost, e, launched=True), e) from e
        t0 = time.perf_counter()
        advanced = self.scheduler.update(sched, result.tokens)
        outputs = self._emit(advanced, result, only_finished)
        self._release_removed()
        now = time.perf_counter()
        self.last_step = StepStats(
            sched.num_tokens,
            result.num_tokens,
            host_seconds=self._launch_seconds + result.host_seconds + (now - t0),
            stage_seconds=in_flight.stage_seconds,
            wait_seconds=result.wait_seconds,
            launch_seconds=in_flight.launch_seconds,
            step_seconds=now - (self._last_finish or now - result.wait_seconds),
        )
        self._last_finish = now
        self.stats.add(self.last_step)
        return outputs

    def _emit(self, advanced: list[Request], result: StepResult, only_finished: bool = False) -> list[RequestOutput]:
        touched = self._record(advanced, result)
        outputs = [self._output(f) for f in touched if not only_finished or all(c.status.finished for c in f.children)]
        for f in touched:
            if all(c.status.finished for c in f.children):
                self._families.pop(f.request_id, None)
        return outputs

    def _record(self, advanced: list[Request], result: StepResult) -> list[_Family]:
        touched: dict[str, _Family] = {}
        for req, entries in result.prompt_logprobs.items():
            family = self._families.get(req.family_id)
            # (the request itself, not its id: it may have finished, or its id been reused)
            if family is None or family.prompt_logprobs is None or family.children[0] is not req:
                continue
            k = family.params.prompt_logprobs
            for pos, lp in entries:
                family.prompt_logprobs[pos] = self._position_logprobs(lp, k)
        for req in advanced:
            family = self._families.get(req.family_id)
            if family is None:  # aborted after its token was sampled
                continue
            i, token = req.index, req.output_token_ids[-1]
            lp = result.logprobs.get(req.request_id)
            if lp is not None:
                family.logprobs[i].append(self._position_logprobs(lp, family.params.logprobs))
                family.cumulative[i] += lp.logprob
            detok = family.detoks[i]
            stop = None if detok is None else detok.push(token)
            if stop is not None:  # a no-op if eos or length already finished it
                self.scheduler.finish(req.request_id, RequestStatus.FINISHED_STOPPED, stop_reason=stop)
            touched[family.request_id] = family
        return list(touched.values())

    def _position_logprobs(self, lp: TokenLogprobs, k: int) -> PositionLogprobs:
        out = {lp.token_id: Logprob(lp.logprob, lp.rank, self._decode_one(lp.token_id))}
        for rank, (tid, val) in enumerate(zip(lp.top_ids[:k], lp.top_logprobs[:k]), start=1):
            if tid >= 0:  # -1 pads a vocabulary smaller than k
                out.setdefault(int(tid), Logprob(float(val), rank, self._decode_one(int(tid))))
        return out

    def _decode_one(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _output(self, family: _Family) -> RequestOutput:
        outs = []
        for i, child in enumerate(family.children):
            finished = child.status.finished
            detok = family.detoks[i]
            outs.append(
                CompletionOutput(
                    index=i,
                    text="" if detok is None else detok.visible_text(finished),
                    token_ids=list(child.output_token_ids),
                    cumulative_logprob=family.cumulative[i] if family.logprobs is not None else None,
                    logprobs=list(family.logprobs[i]) if family.logprobs is not None else None,
                    finish_reason=child.status.value if finished else None,
                    stop_reason=child.stop_reason,
                )
            )
        return RequestOutput(
            family.request_id,
            family.prompt,
            family.prompt_token_ids,
            list(family.prompt_logprobs) if family.prompt_logprobs is not None else None,
            outs,
            all(o.finish_reason is not None for o in outs),
        )

    def _recover(self, sched, lost, error: BaseException, *, launched: bool) -> list[str]:
        """After step `sched` raised: requests whose family already ran alone are failed; the rest
        of the step, and of the steps `lost` with it, is recomputed, each family of `sched` alone
        first. If the step had been launched (the device failed: the cache and device state after
        it derive from the failure) or the device consumed the donated cache, the device state is
        rebuilt and every live request is recomputed."""
        self._last_finish = None
        families = list(dict.fromkeys(c.request.family_id for c in sched.chunks))
        failed = [f for f in families if f in self.scheduler.quarantine]
        for family_id in failed:
            self._families.pop(family_id, None)
            self.scheduler.abort(family_id)
        self._release_removed()
        if launched or any(leaf.is_deleted() for leaf in jax.tree.leaves(self.runner.kv_cache)):
            self.runner.reset_device_state()
            victims = list(self.scheduler.requests.values())  # forked children waiting hold pages too
        else:
            victims = list(dict.fromkeys(c.request for s in (sched, *lost) for c in s.chunks))
        for req in victims:
            self.runner.release(req.request_id)
        self.scheduler.retry(victims)
        self.scheduler.quarantine.update(f for f in families if f not in failed)
        self.log(f"step failed ({type(error).__name__}: {error}); failed {failed}, retrying {len(victims)} requests")
        return failed

    def fail_running(self, error: BaseException) -> list[str]:
        """After a failed step: aborts every request in flight (their cache pages may be lost) and
        rebuilds the device state; returns the aborted request ids."""
        ids = list(self._families)
        for request_id in ids:
            self.abort_request(request_id)
        self._pending_outputs.clear()
        self._in_flight = None
        self.runner.reset_device_state()
        self.log(f"step failed ({type(error).__name__}: {error}); aborted {len(ids)} requests")
        return ids

    # -- state ----------------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        # An unemitted step matters only while its families live (they stay until emitted).
        return bool(self._families) or bool(self._pending_outputs)

    @property
    def num_compilations_since_warmup(self) -> int:
        return compile_counter.compilations() - self.compilations_after_warmup

    @property
    def kv_cache_usage(self) -> float:
        return self.scheduler.kv.usage

    def block_until_idle(self) -> None:
        jax.block_until_ready(self.runner.kv_cache)
