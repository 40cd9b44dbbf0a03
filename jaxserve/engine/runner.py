"""The model runner: device state, the compiled programs, and one step from a SchedulerOutput.

    execute(SchedulerOutput):  input_batch.apply (rows freed, filled, pages appended)
        -> input_batch.stage (numpy over the step's rows, into one packed int32 buffer, padded
           to a bucket) -> model program -> sampler program, both given that buffer (one
           device_put first on a mesh)                                        [returns at once]
    read_back(InFlightStep):   wait -> one copy back -> ModelRunnerOutput (a token per grant,
        logprobs where asked), the tokens also kept in the input batch's rows

It owns the weights, the KV pages, the device state (penalty counts, a page-table row per input
batch row, the last sampled tokens) and the compiled functions of the bucket plan; warm_up()
compiles every shape so that serving compiles nothing. A decode token sampled by the step still
running is not waited for: the next step reads it on the device (prev_seq).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
import types
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxserve.engine.buckets import BucketPlan
from jaxserve.engine.executable_cache import ExecutableCache
from jaxserve.engine.input_batch import InputBatch, StagedStep
from jaxserve.engine.packing import Packing
from jaxserve.engine.sampler import LogitsProcessor, new_logit_bias, new_penalty_state
from jaxserve.engine.step import (
    DeviceState,
    make_prompt_logprobs,
    make_sampler,
    make_step,
    make_write_logit_bias_row,
    make_write_table_row,
    sampler_output_spec,
    step_input_spec,
)
from jaxserve.engine.structured_outputs import GrammarBitmask
from jaxserve.sampling_params import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS
from jaxserve.scheduler.output import SchedulerOutput
from models import allocate_kv_cache
from sharding import kv_cache_sharding

MAX_EOS_IDS = 16
INPUT_BUFFERS_PER_SHAPE = 3  # see ModelRunner._input_buffer
BANNED_WIDTH = MAX_STOP_TOKEN_IDS + MAX_EOS_IDS  # the ids a row bans before min_tokens: stop ids and eos


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int
    top_ids: np.ndarray  # [k]
    top_logprobs: np.ndarray  # [k]


@dataclasses.dataclass
class ModelRunnerOutput:
    tokens: list[int]  # [R] the token each grant sampled (meaningless where it does not sample)
    logprobs: dict[str, TokenLogprobs]  # request id -> its sampled token's, for requests that asked
    prompt_logprobs: dict[str, list[tuple[int, TokenLogprobs]]]  # request id -> (position, logprobs)
    host_seconds: float  # unpacking the result (staging is InFlightStep.stage_seconds)
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
    """A launched step; ModelRunner.read_back(it) waits for it and returns its output."""

    output: SchedulerOutput
    staged: StagedStep
    sampled: jax.Array  # the packed SamplerOutput, on its way to the host
    output_packing: Packing
    hidden: jax.Array
    num_tokens: int
    stage_seconds: float  # applying, staging and launching it
    launch_seconds: float  # of which launching (the compiled call and the read-back request)
    # Launched without its sampler (execute(defer_sampler=True)): (the packed inputs,
    # logits, r, full) until launch_sampler() runs it with the step's grammar bitmask.
    pending_sampler: tuple | None = None


EMPTY_STEP = SchedulerOutput([], [], [], [], [], [], [], 0)


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
        eos_token_ids: frozenset[int] = frozenset(),
        kv_cache_dtype=None,  # the pages' dtype (fp8 or the model's); None: the model's
        estimate_kv_scales: bool = False,  # fp8: scales from the first step that writes K/V, not 1.0
    ):
        cfg = model.config
        self.config = cfg
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_model_len = max_model_len
        self.pages_per_seq = -(-max_model_len // page_size)
        self.plan = plan
        self.num_rows = max_num_seqs  # rows of the input batch (and of the device page table)
        self.max_step_rows = max(r for _, r in plan.shapes)
        self.processor_names = [name for name, _ in processors]
        self.eos_token_ids = eos_token_ids
        self.graphdef, self.state = nnx.split(model)
        self.weights, treedef = jax.tree.flatten(self.state)
        self.dtype = model.dtype
        self.kv_cache_dtype = jnp.dtype(kv_cache_dtype or model.dtype)
        self.estimate_kv_scales = estimate_kv_scales
        self.mesh = getattr(model, "mesh", None)
        self._replicated = None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())
        self._packings: dict[tuple[int, int], tuple[Packing, Packing]] = {}
        self._input_buffers: dict[tuple[int, int], collections.deque] = {}  # (t, r) -> (buffer, views), in turn
        self._compiled: dict[tuple[int, int], CompiledStep] = {}  # filled by warm_up
        self._compiled_prompt_logprobs: dict[int, object] = {}  # token bucket -> executable
        self.bitmask_words = -(-cfg.vocab_size // 32)  # the grammar bitmask's width: 32 tokens a word
        self._all_allowed: dict[int, jax.Array] = {}  # r -> [r, W] all ones, on the device
        self.reset_device_state()
        self._step = make_step(self.graphdef, treedef, self.mesh)
        self._sampler = make_sampler([fn for _, fn in processors], self.mesh)
        self._write_table_row = make_write_table_row(self._replicated)
        self._write_logit_bias_row = make_write_logit_bias_row(self._replicated)
        self._prompt_logprobs = make_prompt_logprobs(self.graphdef)
        # Tests and fault drills: called with each SchedulerOutput once it is applied, before
        # staging; what it raises fails the step as a device error would.
        self.fault_hook: Callable[[SchedulerOutput], None] | None = None

    def reset_device_state(self) -> None:
        """Fresh KV pages, penalty counts, page table and input batch (at start, and after a
        failed step that may have consumed the donated buffers: every request starts over)."""
        cfg = self.config
        self.kv_cache = self.device_state = None  # drop the old buffers before allocating new ones
        self.kv_cache = allocate_kv_cache(
            cfg.num_layers,
            self.num_pages,
            self.page_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            self.kv_cache_dtype,
            None if self.mesh is None else kv_cache_sharding(self.mesh),
            estimate_scales=self.estimate_kv_scales,
        )
        state = DeviceState(
            penalties=new_penalty_state(self.num_rows, cfg.vocab_size),
            page_table=jnp.zeros((self.num_rows + 1, self.pages_per_seq), jnp.int32),
            last_tokens=jnp.zeros(self.max_step_rows, jnp.int32),
            logit_bias=new_logit_bias(self.num_rows, cfg.vocab_size, MAX_LOGIT_BIAS, BANNED_WIDTH),
        )
        self.device_state = state if self.mesh is None else jax.device_put(state, self._replicated)
        self.input_batch = InputBatch(
            max_rows=self.num_rows,
            max_model_len=self.max_model_len,
            page_size=self.page_size,
            pages_per_seq=self.pages_per_seq,
            num_pages=self.num_pages,
            vocab_size=cfg.vocab_size,
            processor_names=self.processor_names,
        )

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
            _, hidden = self._run(self._stage(EMPTY_STEP, t, r)[0], t, r, False)
            self._compiled_prompt_logprobs[t](self.state, hidden, np.zeros(t, np.int32), np.zeros(t, np.int32))
        # The padding rows (num_rows) are empty and stay so: writing them compiles the writers.
        self._write_row(self.num_rows, [])
        self._write_bias_row(self.num_rows, [], [], [])
        jax.block_until_ready(self.kv_cache)
        report.run = time.perf_counter() - t1
        report.total = time.perf_counter() - t0
        return report

    @property
    def devices(self) -> list:
        """The devices the step runs on."""
        return [jax.devices()[0]] if self.mesh is None else list(self.mesh.devices.flat)

    @property
    def compiled_steps(self) -> Mapping[tuple[int, int], CompiledStep]:
        """The compiled programs of each step shape (T, R), read-only (warm_up fills them): for
        tools that inspect them, such as scripts/count_collectives.py."""
        return types.MappingProxyType(self._compiled)

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
            self.num_rows,
            self.processor_names,
            ("grammar bitmask", self.bitmask_words),  # the sampler takes a bitmask argument
        )

    def _run_once(self, t: int, r: int) -> None:
        """Runs shape (t, r) on empty inputs with each sampler, and waits for it."""
        for full in (False, True):
            jax.block_until_ready(self._run(self._stage(EMPTY_STEP, t, r)[0], t, r, full))

    def _lower_prompt_logprobs(self, t: int):
        hidden = jax.ShapeDtypeStruct((t, self.config.hidden_size), self.dtype, sharding=self._replicated)
        rows = jax.ShapeDtypeStruct((t,), jnp.int32)
        return self._prompt_logprobs.lower(self.state, hidden, rows, rows)

    # -- one step -----------------------------------------------------------------------------
    def execute(
        self, output: SchedulerOutput, bitmask: GrammarBitmask | None = None, *, defer_sampler: bool = False
    ) -> InFlightStep | None:
        """Applies the SchedulerOutput to the input batch, stages the step and launches it;
        returns at once while the device works (None if it grants nothing). bitmask: the
        grammar masks of the step's constrained sequences (None: the step has none).
        defer_sampler: launch the model program only; launch_sampler(step, bitmask) launches the
        sampler once the masks are known (they need the tokens of the step still in flight)."""
        t0 = time.perf_counter()
        changes = self.input_batch.apply(output)
        for write in self.input_batch.take_bias_writes(self.eos_token_ids):
            self._write_bias_row(*write)
        if self.fault_hook is not None:
            self.fault_hook(output)
        if not output.num_rows:
            self._write_rows(changes)  # nothing to launch: keep the device table in step
            return None
        t, r = self.plan.pick(output.num_tokens, output.num_rows)
        packed, staged = self._stage(output, t, r, changes)
        t1 = time.perf_counter()
        if defer_sampler:
            packed, logits, hidden = self._launch_model(packed, t, r)
            t2 = time.perf_counter()
            step = InFlightStep(output, staged, None, self._packing(t, r)[1], hidden, t, t2 - t0, t2 - t1)
            step.pending_sampler = (packed, logits, r, staged.needs_sort)
            return step
        masks = self._bitmask(bitmask, r)
        sampled, hidden = self._run(packed, t, r, staged.needs_sort, masks)  # returns once launched (async dispatch)
        sampled.copy_to_host_async()
        t2 = time.perf_counter()
        return InFlightStep(output, staged, sampled, self._packing(t, r)[1], hidden, t, t2 - t0, t2 - t1)

    def launch_sampler(self, step: InFlightStep, bitmask: GrammarBitmask | None) -> None:
        """Launches the sampler of a step execute(defer_sampler=True) launched, with its masks."""
        packed, logits, r, full = step.pending_sampler
        step.pending_sampler = None
        step.sampled = self._launch_sampler(packed, logits, step.num_tokens, r, full, self._bitmask(bitmask, r))
        step.sampled.copy_to_host_async()

    def read_back(self, step: InFlightStep) -> ModelRunnerOutput:
        """Waits for the step, reads its packed output once, keeps the sampled tokens in the
        input batch and returns them by grant."""
        t0 = time.perf_counter()
        sampled = step.output_packing.views(np.asarray(step.sampled))
        waited = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = step.output.num_rows
        self.input_batch.record(step.staged, sampled.tokens)
        tokens = sampled.tokens[:n].tolist()
        logprobs = {}
        for i in np.flatnonzero(step.staged.wants_logprobs):
            logprobs[step.output.request_ids[i]] = TokenLogprobs(
                tokens[i],
                float(sampled.logprobs[i]),
                int(sampled.ranks[i]),
                sampled.top_ids[i].copy(),
                sampled.top_logprobs[i].copy(),
            )
        prompt_lp = self._prompt_logprobs_of(step)
        return ModelRunnerOutput(tokens, logprobs, prompt_lp, time.perf_counter() - t0, step.num_tokens, waited)

    @staticmethod
    def wait_quietly(step: InFlightStep) -> None:
        """Waits for a step whose result no longer matters (it read a failed step's cache)."""
        try:
            jax.block_until_ready((step.sampled, step.hidden))  # a deferred sampler: the model alone
        except Exception:
            pass

    def _bitmask(self, bitmask: GrammarBitmask | None, r: int):
        """The sampler's [r, W] mask: all ones (kept on the device) but the constrained sequences'."""
        if bitmask is None:
            if r not in self._all_allowed:
                ones = np.full((r, self.bitmask_words), -1, np.int32)
                self._all_allowed[r] = jax.device_put(ones, self._replicated)
            return self._all_allowed[r]
        masks = np.full((r, self.bitmask_words), -1, np.int32)
        masks[bitmask.seqs] = bitmask.words
        return jax.device_put(masks, self._replicated)

    def _run(self, packed: np.ndarray, t: int, r: int, full: bool, bitmask=None):
        if bitmask is None:
            bitmask = self._bitmask(None, r)
        packed, logits, hidden = self._launch_model(packed, t, r)
        return self._launch_sampler(packed, logits, t, r, full, bitmask), hidden

    def _launch_model(self, packed: np.ndarray, t: int, r: int):
        """(packed inputs, logits, hidden) of the model program, launched. On one device the host
        buffer goes to each program as it is, transferred by the call itself (~5 us on the CPU;
        jax.device_put's Python path ~45 us), and stays untouched until both have read it (see
        _input_buffer). On a mesh it is put on every device once: on 8 CPU devices a call given
        the host buffer cost ~200 us, one given the device array ~80, and device_put ~70."""
        if self._replicated is not None:
            packed = jax.device_put(packed, self._replicated)
        # Each program's outputs are kept before the next launches: the inputs they replace were
        # donated, so a failure in between must leave valid arrays behind.
        self.kv_cache, self.device_state, logits, hidden = self._compiled[t, r].model(
            self.weights, self.kv_cache, self.device_state, packed
        )
        return packed, logits, hidden

    def _launch_sampler(self, packed, logits, t: int, r: int, full: bool, bitmask):
        compiled = self._compiled[t, r]
        self.device_state, sampled = (compiled.full_sampler if full else compiled.sampler)(
            logits, self.device_state, packed, bitmask
        )
        return sampled

    def _lower(self, t: int, r: int, name: str):
        """The lowered program `name` (one of PROGRAMS) of shape (t, r)."""
        inputs, outputs = self._packing(t, r)
        packed = self._stage(EMPTY_STEP, t, r)[0]
        if name == "model":
            return self._step.lower(self.weights, self.kv_cache, self.device_state, packed, input_packing=inputs)
        logits = jax.ShapeDtypeStruct((r, self.config.vocab_size), jnp.float32, sharding=self._replicated)
        bitmask = self._bitmask(None, r)
        return self._sampler.lower(
            logits,
            self.device_state,
            packed,
            bitmask,
            input_packing=inputs,
            output_packing=outputs,
            full=name == "full_sampler",
        )

    def _packing(self, t: int, r: int) -> tuple[Packing, Packing]:
        """The (input, output) buffer layouts of step shape (t, r); the same objects every step,
        as jit keys its cache on them."""
        if (t, r) not in self._packings:
            self._packings[t, r] = (
                Packing(step_input_spec(t, r, self._max_page_updates(t, r), len(self.processor_names))),
                Packing(sampler_output_spec(r)),
            )
        return self._packings[t, r]

    def _max_page_updates(self, t: int, r: int) -> int:
        # A row of q tokens starts at most ceil(q / S) pages: the sum is <= T // S + R + 1.
        return t // self.page_size + r + 1

    def _write_row(self, row: int, pages) -> None:
        """Writes one whole row of the device page table (the padding row, or a row whose new
        pages outnumber what a step's page updates carry)."""
        padded = _padded(pages, self.pages_per_seq, 0, np.int32)
        table = self._write_table_row(self.device_state.page_table, np.int32(row), padded)
        self.device_state = dataclasses.replace(self.device_state, page_table=table)

    def _write_bias_row(self, row: int, ids: list[int], values: list[float], banned: list[int]) -> None:
        """Writes one row of the device LogitBias table (a request with logit_bias or min_tokens
        took that row), padded with the vocabulary size, which the sampler drops."""
        bias, vocab = self.device_state.logit_bias, self.config.vocab_size
        bias = self._write_logit_bias_row(
            bias,
            np.int32(row),
            _padded(ids, bias.ids.shape[1], vocab, np.int32),
            _padded(values, bias.values.shape[1], 0, np.float32),
            _padded(banned, bias.stop_ids.shape[1], vocab, np.int32),
        )
        self.device_state = dataclasses.replace(self.device_state, logit_bias=bias)

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

    def _stage(self, output: SchedulerOutput, t: int, r: int, changes=()) -> tuple[np.ndarray, StagedStep]:
        """The step's packed input buffer (and what reading it back needs)."""
        buffer, x = self._input_buffer(t, r)
        staged = self.input_batch.stage(output, x)
        self._stage_page_updates(changes, x)
        return buffer, staged

    def _input_buffer(self, t: int, r: int):
        """A zeroed input buffer of shape (t, r) and its views (building the views costs more
        than the rest of a small step's staging). Each shape's buffers are used in turn: the
        loop keeps at most two steps launched, so the device is done with a buffer (and the
        transfer that read it) by the time it comes round again."""
        ring = self._input_buffers.get((t, r))
        if ring is None:
            packing, _ = self._packing(t, r)
            ring = self._input_buffers[t, r] = collections.deque(packing.new() for _ in range(INPUT_BUFFERS_PER_SHAPE))
        ring.rotate(-1)
        buffer, views = ring[-1]
        buffer.fill(0)
        return buffer, views

    def _stage_page_updates(self, changes, x) -> None:
        """Sends the page-table entries the input batch changed; a row with more new pages than
        the step carries (an n > 1 child starting on a long shared prompt) is written whole.
        Gathered in Python lists, written with one slice each (a numpy slice write per change
        cost ~0.6 us: a step of 256 decode rows has ~16, a row enters a new page every S steps)."""
        index, value = x.page_update_index, x.page_update_value
        index[:] = -1  # dropped (flat indices are >= 0)
        table, capacity = self.input_batch.page_table, index.shape[0]
        flat, pages_sent = [], []
        for row, first, pages in changes:
            if len(flat) + len(pages) <= capacity:
                base = row * self.pages_per_seq + first
                flat += range(base, base + len(pages))
                pages_sent += pages
            else:
                self._write_row(row, table[row, : first + len(pages)])
        if flat:
            index[: len(flat)] = flat
            value[: len(flat)] = pages_sent

    def _write_rows(self, changes) -> None:
        table = self.input_batch.page_table
        for row, first, pages in changes:
            self._write_row(row, table[row, : first + len(pages)])

    def _prompt_logprobs_of(self, step: InFlightStep) -> dict[str, list[tuple[int, TokenLogprobs]]]:
        """The logprobs of the prompt tokens this step computed, for the requests that asked."""
        batch, out = self.input_batch, step.output
        staged = step.staged
        if not staged.wants_prompt_logprobs.any():  # (most steps: no rows to check)
            return {}
        wanted = staged.wants_prompt_logprobs & staged.current(batch.generation)  # the prompt is still there
        seq_rows, targets, owners = [], [], []
        offsets = np.concatenate([[0], np.cumsum(out.num_scheduled_tokens)])
        for i in np.flatnonzero(wanted):
            row, start = staged.rows[i], out.num_computed_tokens[i]
            for pos in range(start, min(start + out.num_scheduled_tokens[i], int(batch.num_prompt[row]) - 1)):
                seq_rows.append(offsets[i] + pos - start)
                targets.append(int(batch.token_ids[row, pos + 1]))
                owners.append((out.request_ids[i], pos + 1))
        if not seq_rows:
            return {}
        t, k = step.num_tokens, len(seq_rows)
        pad = lambda a: np.pad(np.asarray(a, np.int32), (0, t - k))  # noqa: E731
        compiled = self._compiled_prompt_logprobs[t]
        chosen, ranks, top_ids, top_vals = jax.device_get(
            compiled(self.state, step.hidden, pad(seq_rows), pad(targets))
        )
        result: dict[str, list[tuple[int, TokenLogprobs]]] = {}
        for j, (request_id, pos) in enumerate(owners):
            result.setdefault(request_id, []).append(
                (pos, TokenLogprobs(targets[j], float(chosen[j]), int(ranks[j]), top_ids[j], top_vals[j]))
            )
        return result


def _padded(values, width: int, fill, dtype) -> np.ndarray:
    """values in a [width] array, the rest `fill`: one row of a device table, written whole."""
    row = np.full(width, fill, dtype)
    row[: len(values)] = values
    return row
