"""The model runner: device state plus the host staging of each step.

    SchedulerOutput --stage (numpy views into one buffer, padded to a bucket)--> StepInput
        --step (jit)--> packed SamplerOutput --one copy to the host--> StepResult: per request,
        the sampled token with its logprobs

It owns the weights, the KV pages, the device state (penalty counts, a page table row per
request slot, the last sampled tokens) and the compiled functions of the bucket plan; warm_up()
compiles every shape so that serving compiles nothing. A decode token sampled by the step still
running is not waited for: the next step reads it on the device (prev_rows).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxserve.engine.buckets import BucketPlan
from jaxserve.engine.executable_cache import ExecutableCache
from jaxserve.engine.sampler import LogitsProcessor, new_penalty_state
from jaxserve.engine.slots import RequestSlots
from jaxserve.engine.staging import SequenceChunk, fill_ragged
from jaxserve.engine.step import (
    DeviceState,
    make_prompt_logprobs,
    make_sampler,
    make_step,
    make_write_table_row,
    sampler_output_spec,
    step_input_spec,
)
from jaxserve.engine.wire import Packing
from jaxserve.sampling_params import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS
from jaxserve.scheduler.request import Request
from jaxserve.scheduler.scheduler import ScheduledChunk, SchedulerOutput
from models import allocate_kv_cache
from sharding import kv_cache_sharding

MAX_EOS_IDS = 16
BIAS_WIDTH = MAX_LOGIT_BIAS + MAX_STOP_TOKEN_IDS + MAX_EOS_IDS  # user biases + eos/stop suppression before min_tokens


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int
    top_ids: np.ndarray  # [k]
    top_logprobs: np.ndarray  # [k]


@dataclasses.dataclass
class StepResult:
    tokens: dict[str, int]  # request id -> sampled token (chunks that sample)
    logprobs: dict[str, TokenLogprobs]  # for requests that asked
    prompt_logprobs: dict[Request, list[tuple[int, TokenLogprobs]]]  # request -> (position, logprobs)
    host_seconds: float  # unpacking the sampled tokens (staging is InFlightStep.stage_seconds)
    num_tokens: int  # the bucket's T
    wait_seconds: float = 0.0  # blocked on the device


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """The executables of one bucket shape (t, r): the model, and the sampler with and without
    the parts that sort the vocabulary."""

    model: object
    sampler: object
    full_sampler: object


PROGRAMS = [f.name for f in dataclasses.fields(CompiledStep)]


@dataclasses.dataclass
class WarmUpReport:
    """What warm-up took: seconds per phase, and how many programs the executable cache gave."""

    lower: float = 0.0  # tracing and lowering (Python, one shape at a time)
    compile: float = 0.0  # compiling, or loading from a cache, on the threads
    run: float = 0.0  # first runs of every shape
    total: float = 0.0
    cached_programs: int = 0


@dataclasses.dataclass
class InFlightStep:
    runner: ModelRunner
    output: SchedulerOutput
    sampled: jax.Array  # the packed SamplerOutput, on its way to the host
    output_packing: Packing
    hidden: jax.Array
    num_tokens: int
    stage_seconds: float  # staging and launching it
    launch_seconds: float  # of which launching (the compiled call and the read-back request)

    def result(self) -> StepResult:
        """Waits for the device, then unpacks the sampled tokens on the host."""
        t0 = time.perf_counter()
        sampled = self.output_packing.views(np.asarray(self.sampled))
        waited = time.perf_counter() - t0
        result = self.runner._unpack(self.output.chunks, sampled, self.hidden, self.num_tokens)
        result.wait_seconds = waited
        return result


class ModelRunner:
    def __init__(
        self,
        model,
        *,
        num_pages: int,
        page_size: int,
        max_model_len: int,
        plan: BucketPlan,
        max_num_seqs: int,
        processors: Sequence[tuple[str, LogitsProcessor]] = (),
    ):
        cfg = model.config
        self.config = cfg
        self.page_size = page_size
        self.num_pages = num_pages
        self.pages_per_seq = -(-max_model_len // page_size)
        self.plan = plan
        self.num_slots = max_num_seqs
        self.max_rows = max(r for _, r in plan.shapes)
        self.processor_names = [name for name, _ in processors]
        self.graphdef, self.state = nnx.split(model)
        self.weights, treedef = jax.tree.flatten(self.state)
        self.dtype = model.dtype
        self.mesh = getattr(model, "mesh", None)
        self._replicated = None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())
        self._packings: dict[tuple[int, int], tuple[Packing, Packing]] = {}
        self._compiled: dict[tuple[int, int], CompiledStep] = {}  # filled by warm_up
        self._compiled_prompt_logprobs: dict[int, object] = {}  # token bucket -> executable
        self.reset_device_state()
        self._step = make_step(self.graphdef, treedef, self.mesh)
        self._sampler = make_sampler([fn for _, fn in processors], self.mesh)
        self._write_table_row = make_write_table_row(self._replicated)
        self._prompt_logprobs = make_prompt_logprobs(self.graphdef)

    def reset_device_state(self) -> None:
        """Fresh KV pages, penalty slots and page table (at start, and after a failed step that may
        have consumed the donated buffers)."""
        cfg = self.config
        self.kv_cache = self.device_state = None  # drop the old buffers before allocating new ones
        self.kv_cache = allocate_kv_cache(
            cfg.num_layers,
            self.num_pages,
            self.page_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            self.dtype,
            None if self.mesh is None else kv_cache_sharding(self.mesh),
        )
        state = DeviceState(
            penalties=new_penalty_state(self.num_slots, cfg.vocab_size),
            page_table=jnp.zeros((self.num_slots + 1, self.pages_per_seq), jnp.int32),
            last_tokens=jnp.zeros(self.max_rows, jnp.int32),
        )
        self.device_state = state if self.mesh is None else jax.device_put(state, self._replicated)
        self.slots = RequestSlots(self.num_slots, cfg.vocab_size, self.processor_names)
        self._last_rows: dict[str, int] = {}  # request id -> its row in the last step launched

    # -- warm-up ------------------------------------------------------------------------------
    def warm_up(
        self, progress: bool = True, threads: int | None = None, cache: ExecutableCache | None = None
    ) -> WarmUpReport:
        """Compiles every shape of the plan, then runs each once on empty inputs; returns the
        time of each phase. Programs come from `cache` when it holds them; the others are
        lowered one by one (Python) and compiled on `threads` threads at once (XLA releases the
        GIL), or loaded from JAX's persistent compilation cache the same way, then saved to
        `cache`. Steps call the compiled executables directly."""
        t0 = time.perf_counter()
        shapes, buckets = self.plan.shapes, self.plan.token_buckets
        threads = threads or max(
            1, min(len(shapes), (os.cpu_count() or 2) // 2, 8)
        )  # XLA compiles with threads of its own too
        programs = [(t, r, name) for t, r in shapes for name in PROGRAMS]
        name_of = lambda t, r, name: f"{name}_t{t}_r{r}"  # noqa: E731
        report = WarmUpReport()

        def compile_and_save(lowered, key):
            compiled = lowered.compile()
            if cache is not None:
                cache.save(name_of(*key), compiled)
            return compiled

        with (
            ThreadPoolExecutor(threads) as pool,
            tqdm(total=len(shapes), desc="Compiling step shapes", unit="shape", disable=not progress) as bar,
        ):
            loaded = dict(zip(programs, pool.map(lambda key: cache and cache.load(name_of(*key)), programs)))
            futures = {}
            for key in programs:
                if loaded[key] is None:
                    t1 = time.perf_counter()
                    lowered = self._lower(*key)
                    report.lower += time.perf_counter() - t1
                    futures[key] = pool.submit(compile_and_save, lowered, key)
            prompt_lp = {t: pool.submit(self._lower_prompt_logprobs(t).compile) for t in buckets}
            for t, r in shapes:
                self._compiled[t, r] = CompiledStep(
                    **{name: loaded[t, r, name] or futures[t, r, name].result() for name in PROGRAMS}
                )
                bar.update()
            self._compiled_prompt_logprobs = {t: f.result() for t, f in prompt_lp.items()}
        report.cached_programs = sum(v is not None for v in loaded.values())
        report.compile = time.perf_counter() - t0 - report.lower
        t1 = time.perf_counter()
        for t, r in shapes:
            try:
                self._run_once(t, r)
            except Exception:
                if not any(loaded[t, r, name] for name in PROGRAMS):
                    raise
                # A program from the executable cache does not run here: compile the shape afresh
                # (over what it saved), on fresh device state, as the failed run may have
                # consumed the donated buffers.
                self.reset_device_state()
                self._compiled[t, r] = CompiledStep(
                    **{name: compile_and_save(self._lower(t, r, name), (t, r, name)) for name in PROGRAMS}
                )
                self._run_once(t, r)
        for t in buckets:
            r = self.plan.row_buckets[t][0]
            _, hidden = self._run(self._stage([], t, r)[0], t, r, False)
            self._compiled_prompt_logprobs[t](self.state, hidden, np.zeros(t, np.int32), np.zeros(t, np.int32))
        # The padding row (slot num_slots) is all zeros and stays so.
        self._write_row(self.num_slots, [])
        jax.block_until_ready(self.kv_cache)
        report.run = time.perf_counter() - t1
        report.total = time.perf_counter() - t0
        return report

    @property
    def devices(self) -> list:
        """The devices the step runs on."""
        return [jax.devices()[0]] if self.mesh is None else list(self.mesh.devices.flat)

    def executable_cache_key(self) -> tuple:
        """What, beyond the code and the devices, shapes this runner's compiled programs."""
        arrays = jax.tree.map(
            lambda a: (a.shape, str(a.dtype), str(a.sharding)), (self.kv_cache, self.device_state, self.weights)
        )
        return (
            self.config,
            str(self.dtype),
            self.graphdef,
            arrays,
            self.page_size,
            self.pages_per_seq,
            self.num_slots,
            self.processor_names,
        )

    def _run_once(self, t: int, r: int) -> None:
        """Runs shape (t, r) on empty inputs with each sampler, and waits for it."""
        for full in (False, True):
            jax.block_until_ready(self._run(self._stage([], t, r)[0], t, r, full))

    def _lower_prompt_logprobs(self, t: int):
        hidden = jax.ShapeDtypeStruct((t, self.config.hidden_size), self.dtype, sharding=self._replicated)
        rows = jax.ShapeDtypeStruct((t,), jnp.int32)
        return self._prompt_logprobs.lower(self.state, hidden, rows, rows)

    # -- one step -----------------------------------------------------------------------------
    def dispatch(self, output: SchedulerOutput) -> InFlightStep:
        """Stages the step and launches it; returns at once while the device works."""
        t0 = time.perf_counter()
        t, r = self.plan.pick(output.num_tokens, len(output.chunks))
        packed, full = self._stage(output.chunks, t, r)
        t1 = time.perf_counter()
        sampled, hidden = self._run(packed, t, r, full)  # returns once launched (async dispatch)
        sampled.copy_to_host_async()
        t2 = time.perf_counter()
        self._last_rows = {c.request.request_id: i for i, c in enumerate(output.chunks) if c.samples}
        return InFlightStep(self, output, sampled, self._packing(t, r)[1], hidden, t, t2 - t0, t2 - t1)

    def _run(self, packed: np.ndarray, t: int, r: int, full: bool):
        compiled = self._compiled[t, r]
        packed = jax.device_put(packed, self._replicated)  # one transfer, read by both programs
        # Each program's outputs are kept before the next launches: the inputs they replace were
        # donated, so a failure in between must leave valid arrays behind.
        self.kv_cache, self.device_state, logits, hidden = compiled.model(
            self.weights, self.kv_cache, self.device_state, packed
        )
        self.device_state, sampled = (compiled.full_sampler if full else compiled.sampler)(
            logits, self.device_state, packed
        )
        return sampled, hidden

    def _lower(self, t: int, r: int, name: str):
        """The lowered program `name` (one of PROGRAMS) of shape (t, r)."""
        inputs, outputs = self._packing(t, r)
        packed = self._stage([], t, r)[0]
        if name == "model":
            return self._step.lower(self.weights, self.kv_cache, self.device_state, packed, input_packing=inputs)
        logits = jax.ShapeDtypeStruct((r, self.config.vocab_size), jnp.float32, sharding=self._replicated)
        return self._sampler.lower(
            logits, self.device_state, packed, input_packing=inputs, output_packing=outputs, full=name == "full_sampler"
        )

    def _packing(self, t: int, r: int) -> tuple[Packing, Packing]:
        """The (input, output) buffer layouts of step shape (t, r); the same objects every step,
        as jit keys its cache on them."""
        if (t, r) not in self._packings:
            self._packings[t, r] = (
                Packing(step_input_spec(t, r, self._max_page_updates(t, r), len(self.processor_names), BIAS_WIDTH)),
                Packing(sampler_output_spec(r)),
            )
        return self._packings[t, r]

    def _max_page_updates(self, t: int, r: int) -> int:
        # A row of q tokens starts at most ceil(q / S) pages: the sum is <= T // S + R + 1.
        return t // self.page_size + r + 1

    def _write_row(self, slot: int, pages) -> None:
        row = np.zeros(self.pages_per_seq, np.int32)
        row[: len(pages)] = pages
        table = self._write_table_row(self.device_state.page_table, np.int32(slot), row)
        self.device_state = dataclasses.replace(self.device_state, page_table=table)

    def step_workspace_bytes(self) -> int:
        """Device memory the largest step needs beyond its inputs (XLA's temporaries plus the
        hidden-state output), from the compiled executable's memory analysis."""
        t = self.plan.token_buckets[-1]
        r = self.plan.row_buckets[t][-1]
        model, full_sampler = (
            self._lower(t, r, name).compile().memory_analysis() for name in ("model", "full_sampler")
        )
        logits = r * self.config.vocab_size * 4  # the model's output, the sampler's input
        return (
            max(int(model.temp_size_in_bytes), int(full_sampler.temp_size_in_bytes))
            + logits
            + t * self.config.hidden_size * jnp.dtype(self.dtype).itemsize
        )

    def state_bytes(self) -> int:
        """Device memory of the state carried between steps (penalty counts, page table)."""
        return sum(a.nbytes for a in jax.tree.leaves(self.device_state))

    def release(self, request_id: str) -> None:
        """Frees the slot of a finished, aborted or preempted request."""
        self.slots.release(request_id)

    def _stage(self, chunks: Sequence[ScheduledChunk], t: int, r: int) -> tuple[np.ndarray, bool]:
        """The step's packed input buffer, and whether it needs the full sampler. Per-request
        values come from the slots' host records by gathering, so the Python work per row is a
        few lookups."""
        packing, _ = self._packing(t, r)
        buffer, x = packing.new()
        n, no_slot = len(chunks), self.num_slots
        seq_chunks, pending = [], []
        for i, c in enumerate(chunks):
            req = c.request
            end, known = c.start + c.num_tokens, req.num_known_tokens
            ids = req.token_ids(c.start, min(end, known))
            if end > known:  # the last token was sampled by the step before, still on the device
                ids = [*ids, 0]  # a placeholder: prev_rows points the device at it
                pending.append(i)
            seq_chunks.append(SequenceChunk(ids, c.start, c.page_ids))
        row_of_token = fill_ragged(
            seq_chunks, x, page_size=self.page_size, num_pages=self.num_pages, pages_per_seq=self.pages_per_seq
        )
        total = row_of_token.shape[0]
        x.prev_rows[:] = -1
        if pending:
            x.prev_rows[x.cu_q_lens[np.asarray(pending) + 1] - 1] = [
                self._last_rows[chunks[i].request.request_id] for i in pending
            ]
        slots = np.fromiter((self.slots.acquire(c.request) for c in chunks), np.int32, n)
        x.table_rows[:] = no_slot
        x.table_rows[:n] = slots
        self._stage_page_updates(chunks, slots, x)
        # Sampling: gathered from the slots; padding rows greedy with nothing to apply.
        s, sb = self.slots.params, x.sampling
        sb.temperature[:n], sb.top_p[:n], sb.min_p[:n] = s.temperature[slots], s.top_p[slots], s.min_p[slots]
        sb.top_p[n:] = 1
        sb.top_k[:] = self.config.vocab_size
        sb.top_k[:n] = s.top_k[slots]
        sb.repetition_penalty[:] = 1
        sb.repetition_penalty[:n] = s.repetition_penalty[slots]
        sb.presence_penalty[:n], sb.frequency_penalty[:n] = s.presence_penalty[slots], s.frequency_penalty[slots]
        sb.seeds[:n] = s.seed[slots]
        sb.counters[:n] = np.fromiter((c.sample_index for c in chunks), np.int32, n)
        sb.wants_logprobs[:n] = s.wants_logprobs[slots]
        sb.processor_mask[:, :n] = s.processor_mask[:, slots]
        penalized = s.has_penalties[slots]
        starts = x.kv_lens[:n] - np.diff(x.cu_q_lens[: n + 1])
        sb.row_slot[:] = no_slot
        sb.row_slot[:n] = np.where(penalized, slots, no_slot)
        sb.reset_slots[:] = no_slot
        sb.reset_slots[:n] = np.where(penalized & (starts == 0), slots, no_slot)
        sb.token_slot[:] = no_slot
        sb.token_slot[:total] = np.where(penalized[row_of_token], slots[row_of_token], no_slot)
        sb.token_is_output[:total] = x.positions[:total] >= s.num_prompt_tokens[slots][row_of_token]
        sb.bias_ids[:] = self.config.vocab_size
        for i in np.flatnonzero(s.needs_bias[slots]):
            self._stage_bias(chunks[i], sb.bias_ids[i], sb.bias_values[i])
        return buffer, bool(s.needs_sort[slots].any())

    def _stage_page_updates(self, chunks, slots: np.ndarray, x) -> None:
        """Sends the pages each request got since its page-table row was last written."""
        synced = self.slots.params.synced_pages
        x.page_update_index[:] = -1  # dropped (flat indices are >= 0)
        counts = np.fromiter((len(c.page_ids) for c in chunks), np.int32, len(chunks))
        updates, capacity = 0, x.page_update_index.shape[0]
        for i in np.flatnonzero(counts > synced[slots]):
            slot, page_ids = slots[i], chunks[i].page_ids
            first = synced[slot]
            new = len(page_ids) - first
            if updates + new <= capacity:
                base = slot * self.pages_per_seq + first
                x.page_update_index[updates : updates + new] = np.arange(base, base + new)
                x.page_update_value[updates : updates + new] = page_ids[first:]
                updates += new
            else:  # more than a step carries (an n > 1 child starting on a shared prompt)
                self._write_row(slot, page_ids)
            synced[slot] = len(page_ids)

    @staticmethod
    def _stage_bias(chunk: ScheduledChunk, bias_ids: np.ndarray, bias_values: np.ndarray) -> None:
        """logit_bias, plus -inf on eos and stop ids while fewer than min_tokens are out."""
        req, p = chunk.request, chunk.request.sampling_params
        bias = dict(p.logit_bias)
        if chunk.sample_index < p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(req.eos_token_ids))
            bias.update({tok: -np.inf for tok in banned})
        bias_ids[: len(bias)] = list(bias.keys())
        bias_values[: len(bias)] = list(bias.values())

    def _unpack(self, chunks, sampled, hidden, t: int) -> StepResult:
        t0 = time.perf_counter()
        tokens, logprobs = {}, {}
        for i, c in enumerate(chunks):
            if not c.samples:
                continue
            rid = c.request.request_id
            tokens[rid] = int(sampled.tokens[i])
            if c.request.sampling_params.logprobs is not None:
                logprobs[rid] = TokenLogprobs(
                    tokens[rid],
                    float(sampled.logprobs[i]),
                    int(sampled.ranks[i]),
                    sampled.top_ids[i].copy(),
                    sampled.top_logprobs[i].copy(),
                )
        prompt_lp = self._prompt_logprobs_of(chunks, hidden, t)
        return StepResult(tokens, logprobs, prompt_lp, time.perf_counter() - t0, t)

    def _prompt_logprobs_of(self, chunks, hidden, t: int):
        rows, targets, owners = [], [], []
        offset = 0
        for c in chunks:
            req = c.request
            if req.sampling_params.prompt_logprobs is not None and req.prefix_len is None:
                for pos in range(c.start, min(c.start + c.num_tokens, req.num_prompt_tokens - 1)):
                    rows.append(offset + pos - c.start)
                    targets.append(req.prompt_token_ids[pos + 1])
                    owners.append((req, pos + 1))
            offset += c.num_tokens
        if not rows:
            return {}
        n = len(rows)
        pad = lambda a: np.pad(np.asarray(a, np.int32), (0, t - n))  # noqa: E731
        compiled = self._compiled_prompt_logprobs[t]
        chosen, ranks, top_ids, top_vals = jax.device_get(compiled(self.state, hidden, pad(rows), pad(targets)))
        out: dict[Request, list[tuple[int, TokenLogprobs]]] = {}
        for k, (req, pos) in enumerate(owners):
            out.setdefault(req, []).append(
                (pos, TokenLogprobs(targets[k], float(chosen[k]), int(ranks[k]), top_ids[k], top_vals[k]))
            )
        return out
