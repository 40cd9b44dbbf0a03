"""The model runner: device state plus the host staging of each step.

    SchedulerOutput --stage (numpy, padded to a bucket)--> StepInput --step (jit)--> SamplerOutput
        --device_get--> StepResult: per request, the sampled token with its logprobs

It owns the weights, the KV pages, the penalty slots and the compiled functions of the bucket
plan; warm_up() compiles every shape so that serving compiles nothing.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxserve.engine.buckets import BucketPlan
from jaxserve.engine.sampler import LogitsProcessor, SamplingBatch, new_penalty_state
from jaxserve.engine.staging import SequenceChunk, stage_batch
from jaxserve.engine.step import StepInput, make_prompt_logprobs, make_step
from jaxserve.sampling_params import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS
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
    prompt_logprobs: dict[str, list[tuple[int, TokenLogprobs]]]  # request id -> (position, logprobs)
    host_seconds: float  # staging + unpacking, not waiting on the device
    num_tokens: int  # the bucket's T
    wait_seconds: float = 0.0  # blocked on the device


@dataclasses.dataclass
class InFlightStep:
    runner: "ModelRunner"
    output: SchedulerOutput
    sampled: object  # SamplerOutput of device arrays
    hidden: jax.Array
    num_tokens: int
    stage_seconds: float

    def result(self) -> StepResult:
        """Waits for the device, then unpacks the sampled tokens on the host."""
        t0 = time.perf_counter()
        sampled = jax.device_get(self.sampled)
        waited = time.perf_counter() - t0
        result = self.runner._unpack(self.output.chunks, sampled, self.hidden, self.num_tokens)
        result.host_seconds += self.stage_seconds
        result.wait_seconds = waited
        return result


class ModelRunner:
    def __init__(self, model, *, num_pages: int, page_size: int, max_model_len: int, plan: BucketPlan,
                 max_num_seqs: int, processors: Sequence[tuple[str, LogitsProcessor]] = ()):
        cfg = model.config
        self.config = cfg
        self.page_size = page_size
        self.num_pages = num_pages
        self.pages_per_seq = -(-max_model_len // page_size)
        self.plan = plan
        self.num_slots = max_num_seqs
        self.processor_names = [name for name, _ in processors]
        self.graphdef, self.state = nnx.split(model)
        self.dtype = model.dtype
        self.mesh = getattr(model, "mesh", None)
        self.reset_device_state()
        self._step = make_step(self.graphdef, [fn for _, fn in processors], self.mesh)
        self._prompt_logprobs = make_prompt_logprobs(self.graphdef)

    def reset_device_state(self) -> None:
        """Fresh KV pages and penalty slots (at start, and after a failed step that may have
        consumed the donated buffers)."""
        cfg = self.config
        self.kv_cache = allocate_kv_cache(cfg.num_layers, self.num_pages, self.page_size, cfg.num_kv_heads, cfg.head_dim,
                                          self.dtype, None if self.mesh is None else kv_cache_sharding(self.mesh))
        self.penalties = new_penalty_state(self.num_slots, cfg.vocab_size)
        if self.mesh is not None:
            self.penalties = jax.device_put(self.penalties, NamedSharding(self.mesh, PartitionSpec()))
        self._free_slots = list(range(self.num_slots))
        self._slots = {}

    # -- warm-up ------------------------------------------------------------------------------
    def warm_up(self, progress: bool = True) -> float:
        """Compiles (and runs once, on empty inputs) every shape of the plan; returns seconds."""
        t0 = time.perf_counter()
        shapes = self.plan.shapes
        for t, r in tqdm(shapes, desc="Compiling step shapes", unit="shape", disable=not progress):
            self._run(self._stage([], t, r))
        for t in tqdm(self.plan.token_buckets, desc="Compiling prompt logprobs", unit="shape", disable=not progress):
            _, hidden = self._run(self._stage([], t, self.plan.row_buckets[t][0]))  # hidden as steps place it
            self._prompt_logprobs(self.state, hidden, np.zeros(t, np.int32), np.zeros(t, np.int32))
        jax.block_until_ready(self.kv_cache)
        return time.perf_counter() - t0

    # -- one step -----------------------------------------------------------------------------
    def dispatch(self, output: SchedulerOutput) -> "InFlightStep":
        """Stages the step and launches it; returns at once while the device works."""
        t0 = time.perf_counter()
        t, r = self.plan.pick(output.num_tokens, len(output.chunks))
        inputs = self._stage(output.chunks, t, r)
        staged = time.perf_counter()
        sampled, hidden = self._run(inputs)  # returns once launched (async dispatch)
        return InFlightStep(self, output, sampled, hidden, t, staged - t0)

    def execute(self, output: SchedulerOutput) -> StepResult:
        return self.dispatch(output).result()

    def _run(self, inputs: StepInput):
        self.kv_cache, self.penalties, sampled, hidden = self._step(self.state, self.kv_cache, self.penalties, inputs)
        return sampled, hidden

    def step_workspace_bytes(self) -> int:
        """Device memory the largest step needs beyond its inputs (XLA's temporaries plus the
        hidden-state output), from the compiled executable's memory analysis."""
        t = self.plan.token_buckets[-1]
        r = self.plan.row_buckets[t][-1]
        compiled = self._step.lower(self.state, self.kv_cache, self.penalties, self._stage([], t, r)).compile()
        analysis = compiled.memory_analysis()
        return int(analysis.temp_size_in_bytes) + t * self.config.hidden_size * jnp.dtype(self.dtype).itemsize

    def state_bytes(self) -> int:
        """Device memory of the per-slot penalty statistics (allocated beside the KV cache)."""
        return sum(a.nbytes for a in jax.tree.leaves(self.penalties))

    def release(self, request_id: str) -> None:
        """Frees the penalty slot of a finished, aborted or preempted request."""
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            self._free_slots.append(slot)

    def _stage(self, chunks: Sequence[ScheduledChunk], t: int, r: int) -> StepInput:
        vocab = self.config.vocab_size
        seq_chunks = [SequenceChunk(c.request.token_ids(c.start, c.start + c.num_tokens), c.start, c.page_ids)
                      for c in chunks]
        tokens, attention, logits_rows = stage_batch(seq_chunks, num_tokens=t, num_rows=r, pages_per_seq=self.pages_per_seq,
                                                     page_size=self.page_size, num_pages=self.num_pages)
        no_slot = self.num_slots
        f32 = lambda v: np.full(r, v, np.float32)  # noqa: E731
        temperature, top_p, min_p = f32(0), f32(1), f32(0)
        rep, presence, frequency = f32(1), f32(0), f32(0)
        top_k = np.full(r, vocab, np.int32)
        bias_ids = np.full((r, BIAS_WIDTH), vocab, np.int32)
        bias_values = np.zeros((r, BIAS_WIDTH), np.float32)
        seeds = np.zeros(r, np.uint32)
        counters = np.zeros(r, np.int32)
        wants_logprobs = np.zeros(r, bool)
        processor_mask = np.zeros((len(self.processor_names), r), bool)
        row_slot = np.full(r, no_slot, np.int32)
        reset_slots = np.full(r, no_slot, np.int32)
        token_slot = np.full(t, no_slot, np.int32)
        token_is_output = np.zeros(t, bool)
        offset = 0
        for i, c in enumerate(chunks):
            req, p = c.request, c.request.sampling_params
            temperature[i], top_p[i], min_p[i] = p.temperature, p.top_p, p.min_p
            top_k[i] = vocab if p.top_k == -1 else min(p.top_k, vocab)
            rep[i], presence[i], frequency[i] = p.repetition_penalty, p.presence_penalty, p.frequency_penalty
            if p.logit_bias or len(req.output_token_ids) < p.min_tokens:
                bias = dict(p.logit_bias)
                if len(req.output_token_ids) < p.min_tokens:
                    banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(req.eos_token_ids))
                    bias.update({tok: -np.inf for tok in banned})
                bias_ids[i, : len(bias)] = list(bias.keys())
                bias_values[i, : len(bias)] = list(bias.values())
            seeds[i], counters[i] = req.seed, len(req.output_token_ids)
            wants_logprobs[i] = p.logprobs is not None
            for j, name in enumerate(self.processor_names):
                processor_mask[j, i] = name in p.logits_processors
            if p.has_penalties:
                slot = self._slots.get(req.request_id)
                if slot is None:
                    slot = self._slots[req.request_id] = self._free_slots.pop()
                if c.start == 0:
                    reset_slots[i] = slot
                row_slot[i] = slot
                token_slot[offset : offset + c.num_tokens] = slot
            positions = np.arange(c.start, c.start + c.num_tokens)
            token_is_output[offset : offset + c.num_tokens] = positions >= req.num_prompt_tokens
            offset += c.num_tokens
        sampling = SamplingBatch(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=rep,
            presence_penalty=presence, frequency_penalty=frequency, bias_ids=bias_ids, bias_values=bias_values,
            seeds=seeds, counters=counters, wants_logprobs=wants_logprobs, processor_mask=processor_mask,
            row_slot=row_slot, reset_slots=reset_slots, token_slot=token_slot, token_is_output=token_is_output,
        )
        return StepInput(tokens=tokens, attention=attention, logits_rows=logits_rows, sampling=sampling)

    def _unpack(self, chunks, sampled, hidden, t: int) -> StepResult:
        t0 = time.perf_counter()
        tokens, logprobs = {}, {}
        for i, c in enumerate(chunks):
            if not c.samples:
                continue
            rid = c.request.request_id
            tokens[rid] = int(sampled.tokens[i])
            if c.request.sampling_params.logprobs is not None:
                logprobs[rid] = TokenLogprobs(tokens[rid], float(sampled.logprobs[i]), int(sampled.ranks[i]),
                                              sampled.top_ids[i], sampled.top_logprobs[i])
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
                    owners.append((req.request_id, pos + 1))
            offset += c.num_tokens
        if not rows:
            return {}
        n = len(rows)
        pad = lambda a: np.pad(np.asarray(a, np.int32), (0, t - n))  # noqa: E731
        chosen, ranks, top_ids, top_vals = jax.device_get(self._prompt_logprobs(self.state, hidden, pad(rows), pad(targets)))
        out: dict[str, list[tuple[int, TokenLogprobs]]] = {}
        for k, (rid, pos) in enumerate(owners):
            out.setdefault(rid, []).append(
                (pos, TokenLogprobs(targets[k], float(chosen[k]), int(ranks[k]), top_ids[k], top_vals[k])))
        return out
