"""The compiled step: (weights, KV cache, penalty state, staged inputs) -> (KV cache, penalty
state, sampled tokens, hidden states). One jit per bucket shape; the caches are donated, so XLA
writes this step's K/V and token counts in place.

The NNX model is split once into a static graph and plain array leaves; the jitted function
merges them inside the trace, so no per-step NNX flattening happens on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.engine.sampler import (
    LogitsProcessor,
    PenaltyState,
    SamplingBatch,
    sample,
    top_logprobs,
    update_penalty_state,
)
from models import LlamaForCausalLM, RaggedBatch
from sharding import kv_cache_sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInput:
    tokens: jax.Array  # [T] i32
    attention: RaggedBatch
    logits_rows: jax.Array  # [R] i32: the flat index of each row's last token
    sampling: SamplingBatch


def make_step(graphdef: nnx.GraphDef, processors: Sequence[LogitsProcessor] = (), mesh: Mesh | None = None):
    """step(state, kv_cache, penalties, inputs) -> (kv_cache, penalties, SamplerOutput, hidden [T, D])."""

    def step(state, kv_cache, penalties: PenaltyState, inputs: StepInput):
        model: LlamaForCausalLM = nnx.merge(graphdef, state)
        hidden, kv_cache = model(inputs.tokens, kv_cache, inputs.attention)
        penalties = update_penalty_state(penalties, inputs.tokens, inputs.sampling)
        logits = model.logits(hidden[inputs.logits_rows])
        if mesh is not None:
            # Pin every carried-over array to one placement, so that step n's outputs are step
            # n+1's inputs exactly (a new placement would recompile); lm_head is split by
            # vocabulary, and sampling must see it whole.
            replicated = NamedSharding(mesh, PartitionSpec())
            kv_cache = jax.lax.with_sharding_constraint(kv_cache, kv_cache_sharding(mesh))
            penalties, hidden, logits = jax.lax.with_sharding_constraint((penalties, hidden, logits), replicated)
        out = sample(logits, inputs.sampling, penalties, processors)
        return kv_cache, penalties, out, hidden

    return jax.jit(step, donate_argnames=("kv_cache", "penalties"))


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
