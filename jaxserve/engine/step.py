"""The compiled step, two programs per bucket shape that the host launches back to back:

    model:   (weights, KV cache, device state, packed inputs) -> (KV cache, device state, logits, hidden)
    sampler: (logits, device state, packed inputs, grammar bitmask) -> (device state, one packed output buffer)

The KV cache and the device state (penalty counts, page table, last sampled tokens) are donated,
so XLA updates them in place. The sampler comes in two variants, and the host, which knows every
row's parameters, picks one per step: `full` sorts the vocabulary (top-k/top-p/min-p, top
logprobs), the other skips that. The choice cannot be made on the device: XLA on the GPU runs a
lax.cond by copying its predicate to the host and waiting, which would stall every launch.

The NNX model is split once into a static graph and a flat list of weight arrays; the jitted
function merges them inside the trace, so no per-step pytree walking of NNX state on the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.engine.sampler import (
    LogitBias,
    LogitsProcessor,
    PenaltyState,
    SamplerOutput,
    SamplingBatch,
    sample,
    top_logprobs,
    update_penalty_state,
    write_logit_bias_row,
)
from jaxserve.sampling_params import MAX_LOGPROBS
from models import LlamaForCausalLM, RaggedBatch, kv_cache_shardings
from sharding import kv_cache_sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInput:
    """What the host stages per step (one packed buffer, see packing.py). The page table is not sent
    whole: it lives on the device, one row per row of the input batch, and each step carries only the
    pages allocated since (page_update_*)."""

    tokens: jax.Array  # [T] i32
    prev_seq: jax.Array  # [T] i32: -1, or the previous step's sequence that sampled this token
    positions: jax.Array  # [T] i32
    slot_mapping: jax.Array  # [T] i32
    cu_q_lens: jax.Array  # [R+1] i32
    kv_lens: jax.Array  # [R] i32
    num_seqs: jax.Array  # [1] i32
    table_rows: jax.Array  # [R] i32: each sequence's row of the device page table
    page_update_index: jax.Array  # [U] i32: flat index into the page table, out of range = none
    page_update_value: jax.Array  # [U] i32: the page id to write there
    logits_rows: jax.Array  # [R] i32: the flat index of each row's last token
    sampling: SamplingBatch


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceState:
    """Carried from step to step on the device (donated, updated in place)."""

    penalties: PenaltyState
    page_table: jax.Array  # [rows + 1, P_max] i32; the last row stays zero (padding sequences)
    last_tokens: jax.Array  # [R_max] i32: the previous step's sampled token per row
    logit_bias: LogitBias  # written per row when a request with logit_bias or min_tokens takes it


def make_step(graphdef: nnx.GraphDef, treedef, mesh: Mesh | None = None):
    """step(weights (flat leaves), kv_cache, DeviceState, packed inputs, *, input_packing)
    -> (kv_cache, DeviceState, logits [R, V] f32, hidden [T, D]).

    A decode token still unknown to the host (async scheduling: step n+1 is staged before step
    n's tokens are read back) is taken from last_tokens on the device."""

    def step(weights, kv_cache, state: DeviceState, packed, *, input_packing):
        model: LlamaForCausalLM = nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))
        inputs: StepInput = input_packing.unpack(packed)
        tokens = jnp.where(inputs.prev_seq >= 0, state.last_tokens[jnp.maximum(inputs.prev_seq, 0)], inputs.tokens)
        table = state.page_table.reshape(-1).at[inputs.page_update_index].set(inputs.page_update_value, mode="drop")
        table = table.reshape(state.page_table.shape)
        batch = RaggedBatch(
            positions=inputs.positions,
            slot_mapping=inputs.slot_mapping,
            cu_q_lens=inputs.cu_q_lens,
            kv_lens=inputs.kv_lens,
            page_table=table[inputs.table_rows],
            num_seqs=inputs.num_seqs,
        )
        hidden, kv_cache = model(tokens, kv_cache, batch)
        penalties = update_penalty_state(state.penalties, tokens, inputs.sampling)
        logits = model.logits(hidden[inputs.logits_rows])
        if mesh is not None:
            # Pin every carried-over array to one placement, so that step n's outputs are step
            # n+1's inputs exactly (a new placement would recompile); lm_head is split by
            # vocabulary, and sampling must see it whole.
            replicated = NamedSharding(mesh, PartitionSpec())
            kv_cache = jax.lax.with_sharding_constraint(
                kv_cache, kv_cache_shardings(len(kv_cache), kv_cache_sharding(mesh), kv_cache[0].estimate_scales)
            )
            penalties, table, hidden, logits = jax.lax.with_sharding_constraint(
                (penalties, table, hidden, logits), replicated
            )
        return kv_cache, DeviceState(penalties, table, state.last_tokens, state.logit_bias), logits, hidden

    return jax.jit(step, donate_argnames=("kv_cache", "state"), static_argnames=("input_packing",))


def make_sampler(processors: Sequence[LogitsProcessor] = (), mesh: Mesh | None = None):
    """sampler(logits, DeviceState, packed inputs, bitmask [R, ceil(V / 32)] i32, *, input_packing,
    output_packing, full) -> (DeviceState with this step's tokens as last_tokens, packed SamplerOutput).
    The bitmask is a separate argument, not part of the packed buffer: steps without a grammar
    pass an all-ones array that stays on the device."""

    def sampler(logits, state: DeviceState, packed, bitmask, *, input_packing, output_packing, full):
        inputs: StepInput = input_packing.unpack(packed)
        out = sample(logits, inputs.sampling, state.penalties, state.logit_bias, processors, full=full, bitmask=bitmask)
        last_tokens = jnp.zeros_like(state.last_tokens).at[: out.tokens.shape[0]].set(out.tokens)
        if mesh is not None:
            last_tokens = jax.lax.with_sharding_constraint(last_tokens, NamedSharding(mesh, PartitionSpec()))
        return dataclasses.replace(state, last_tokens=last_tokens), output_packing.pack(out)

    return jax.jit(sampler, donate_argnames=("state",), static_argnames=("input_packing", "output_packing", "full"))


def make_write_table_row(sharding: NamedSharding | None = None):
    """(page_table, row, pages [P_max]) -> page_table with that row replaced: for a request
    whose pages outnumber what a step's page updates carry (an n > 1 child sharing a long prompt)."""
    return jax.jit(lambda table, row, pages: table.at[row].set(pages), donate_argnums=0, out_shardings=sharding)


def make_write_logit_bias_row(sharding: NamedSharding | None = None):
    """(LogitBias, row, ids [B], values [B], stop_ids [S]) -> LogitBias with that row replaced."""
    return jax.jit(write_logit_bias_row, donate_argnums=0, out_shardings=sharding)


def step_input_spec(t: int, r: int, num_page_updates: int, num_processors: int) -> StepInput:
    """The shapes and dtypes of a (t, r) step's inputs: the template of its packed buffer."""
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    b = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bool_)  # noqa: E731
    sampling = SamplingBatch(
        temperature=f32(r),
        top_k=i32(r),
        top_p=f32(r),
        min_p=f32(r),
        repetition_penalty=f32(r),
        presence_penalty=f32(r),
        frequency_penalty=f32(r),
        bias_row=i32(r),
        ban_stops=b(r),
        seeds=jax.ShapeDtypeStruct((r,), jnp.uint32),
        counters=i32(r),
        wants_logprobs=b(r),
        processor_mask=b(num_processors, r),
        penalty_row=i32(r),
        reset_rows=i32(r),
        token_row=i32(t),
        token_is_output=b(t),
    )
    return StepInput(
        tokens=i32(t),
        prev_seq=i32(t),
        positions=i32(t),
        slot_mapping=i32(t),
        cu_q_lens=i32(r + 1),
        kv_lens=i32(r),
        num_seqs=i32(1),
        table_rows=i32(r),
        page_update_index=i32(num_page_updates),
        page_update_value=i32(num_page_updates),
        logits_rows=i32(r),
        sampling=sampling,
    )


def sampler_output_spec(r: int) -> SamplerOutput:
    return SamplerOutput(
        tokens=jax.ShapeDtypeStruct((r,), jnp.int32),
        logprobs=jax.ShapeDtypeStruct((r,), jnp.float32),
        ranks=jax.ShapeDtypeStruct((r,), jnp.int32),
        top_ids=jax.ShapeDtypeStruct((r, MAX_LOGPROBS), jnp.int32),
        top_logprobs=jax.ShapeDtypeStruct((r, MAX_LOGPROBS), jnp.float32),
    )


def make_prompt_logprobs(graphdef: nnx.GraphDef):
    """(state, hidden [T, D], rows [T'], targets [T']) -> logprob of each target, its rank, and the
    top alternatives: the logprobs of prompt tokens, from a step's hidden states."""

    def prompt_logprobs(state, hidden, rows, targets):
        model: LlamaForCausalLM = nnx.merge(graphdef, state)
        logprobs = jax.nn.log_softmax(model.logits(hidden[rows]), axis=-1)
        chosen = jax.numpy.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
        ranks = 1 + (logprobs > chosen[:, None]).sum(-1)
        top_ids, top_vals = top_logprobs(logprobs)
        return chosen, ranks, top_ids, top_vals

    return jax.jit(prompt_logprobs)


def make_forward(graphdef: nnx.GraphDef):
    """forward(state, kv_cache, tokens [T], batch, logits_rows [R]) -> (kv_cache, logits [R, V] f32):
    the model alone, for tests and simple drivers."""

    def forward(state, kv_cache, tokens, batch: RaggedBatch, logits_rows):
        model: LlamaForCausalLM = nnx.merge(graphdef, state)
        hidden, kv_cache = model(tokens, kv_cache, batch)
        return kv_cache, model.logits(hidden[logits_rows])

    return jax.jit(forward, donate_argnames=("kv_cache",))
