"""On-device sampling: logits [R, V] of one step -> a token per row, with its logprob.

    raw logits --log_softmax--> logprobs (returned: the model's own, as vLLM does by default)
    raw logits -> user logits processors -> penalties -> logit_bias -> grammar bitmask -> greedy pick
               -> / temperature -> top_k / top_p / min_p cut -> inverse-CDF draw with the row's key

Each request is one row with its own parameters, so one batch mixes greedy and sampled rows.
Every part runs for every row, with neutral parameters where a row asks for nothing: no
lax.cond, because XLA on the GPU runs a conditional by copying its predicate to the host and
waiting for it, which blocks the launch of a step until the device has reached its sampler.
The parts that sort the vocabulary are left out at trace time (full=False) when the host knows
no row of the step needs them.
Keys come from (seed, counter): a seeded request draws the same numbers whatever its neighbours.

logit_bias and the ban on eos/stop ids before min_tokens come from a table kept on the device
(LogitBias), one row per input-batch row, written once when a request takes its row: a step
sends each sequence's table row and whether its stop ids are banned, never the entries
themselves (300 + 80 per row, most of them unused padding, were 97% of a 256-row step's inputs).

The grammar bitmask (structured outputs) is packed on the host, 32 tokens per int32 word, and
unpacked here: a row without a grammar is all ones, and a step without any constrained row
passes one all-ones array kept on the device (nothing uploaded, the same program).

Penalties read per-row token statistics kept on the device across steps (PenaltyState): each
request with penalties uses its input-batch row; the step counts its tokens into that row as they enter the
model (prompt tokens into a mask, generated ones into counts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxserve.sampling_params import MAX_LOGPROBS

LogitsProcessor = Callable[[jax.Array], jax.Array]  # logits [R, V] f32 -> logits [R, V]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    temperature: jax.Array  # [R] f32, 0 = greedy
    top_k: jax.Array  # [R] i32, V = no limit
    top_p: jax.Array  # [R] f32
    min_p: jax.Array  # [R] f32
    repetition_penalty: jax.Array  # [R] f32
    presence_penalty: jax.Array  # [R] f32
    frequency_penalty: jax.Array  # [R] f32
    bias_row: jax.Array  # [R] i32 the sequence's LogitBias row; rows = the empty last row
    ban_stops: jax.Array  # [R] bool: fewer than min_tokens out, its eos and stop ids are banned
    seeds: jax.Array  # [R] u32
    counters: jax.Array  # [R] i32, tokens generated so far: the key's second half
    wants_logprobs: jax.Array  # [R] bool
    processor_mask: jax.Array  # [num_processors, R] bool
    penalty_row: jax.Array  # [R] i32 the sequence's penalty row, num_rows = none
    reset_rows: jax.Array  # [R] i32 rows to clear before counting (first chunk), num_rows = none
    token_row: jax.Array  # [T] i32 penalty row of each input token, num_rows = none
    token_is_output: jax.Array  # [T] bool: a generated token (counts) or a prompt token (mask)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PenaltyState:
    output_counts: jax.Array  # [rows, V] i32
    prompt_mask: jax.Array  # [rows, V] bool


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LogitBias:
    """Per-row logit bias on the device; the last row is empty (rows without any bias use it)."""

    ids: jax.Array  # [rows + 1, B] i32, padding = V (dropped)
    values: jax.Array  # [rows + 1, B] f32
    stop_ids: jax.Array  # [rows + 1, S] i32: eos and stop ids, banned while ban_stops; padding = V


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    tokens: jax.Array  # [R] i32
    logprobs: jax.Array  # [R] f32 of the chosen tokens
    ranks: jax.Array  # [R] i32, 1 = most likely
    top_ids: jax.Array  # [R, MAX_LOGPROBS] i32
    top_logprobs: jax.Array  # [R, MAX_LOGPROBS] f32


def new_penalty_state(num_rows: int, vocab_size: int) -> PenaltyState:
    return PenaltyState(jnp.zeros((num_rows, vocab_size), jnp.int32), jnp.zeros((num_rows, vocab_size), jnp.bool_))


def new_logit_bias(num_rows: int, vocab_size: int, width: int, stops_width: int) -> LogitBias:
    return LogitBias(
        jnp.full((num_rows + 1, width), vocab_size, jnp.int32),
        jnp.zeros((num_rows + 1, width), jnp.float32),
        jnp.full((num_rows + 1, stops_width), vocab_size, jnp.int32),
    )


def write_logit_bias_row(bias: LogitBias, row, ids, values, stop_ids) -> LogitBias:
    """The table with row `row` replaced (ids [B], values [B], stop_ids [S], padded with V)."""
    return LogitBias(bias.ids.at[row].set(ids), bias.values.at[row].set(values), bias.stop_ids.at[row].set(stop_ids))


def update_penalty_state(state: PenaltyState, tokens: jax.Array, sb: SamplingBatch) -> PenaltyState:
    """Clears the rows of requests starting afresh, then counts this step's input tokens."""
    counts, mask = state.output_counts, state.prompt_mask
    num_rows, vocab = counts.shape
    reset = sb.reset_rows
    counts = counts.at[reset].set(jnp.zeros((reset.shape[0], vocab), counts.dtype), mode="drop")
    mask = mask.at[reset].set(jnp.zeros((reset.shape[0], vocab), mask.dtype), mode="drop")
    row_out = jnp.where(sb.token_is_output, sb.token_row, num_rows)
    row_prompt = jnp.where(sb.token_is_output, num_rows, sb.token_row)
    counts = counts.at[row_out, tokens].add(1, mode="drop")
    mask = mask.at[row_prompt, tokens].set(True, mode="drop")
    return PenaltyState(counts, mask)


def _apply_penalties(logits, state: PenaltyState, sb: SamplingBatch):
    counts = state.output_counts.at[sb.penalty_row].get(mode="fill", fill_value=0)  # [R, V]
    seen = counts > 0
    in_prompt = state.prompt_mask.at[sb.penalty_row].get(mode="fill", fill_value=False)
    rep = sb.repetition_penalty[:, None]
    penalized = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen | in_prompt, penalized, logits)
    logits = logits - sb.frequency_penalty[:, None] * counts - sb.presence_penalty[:, None] * seen
    return logits


def _apply_bias(logits, bias: LogitBias, sb: SamplingBatch):
    """Adds each sequence's logit_bias, then bans its eos and stop ids where ban_stops."""
    num_rows, vocab = logits.shape
    ids = bias.ids[sb.bias_row]  # [R, B]
    rows = jnp.broadcast_to(jnp.arange(num_rows)[:, None], ids.shape)
    logits = logits.at[rows, ids].add(bias.values[sb.bias_row], mode="drop")
    stops = jnp.where(sb.ban_stops[:, None], bias.stop_ids[sb.bias_row], vocab)  # [R, S]
    rows = jnp.broadcast_to(jnp.arange(num_rows)[:, None], stops.shape)
    return logits.at[rows, stops].set(-jnp.inf, mode="drop")


def _truncate(logits, sb: SamplingBatch):
    """Masks tokens outside top_k, outside the top_p nucleus, or below min_p * max prob; rows that
    set none of the three pass unchanged. The most likely token always survives (as in vLLM): a
    top_p that float32 rounds to 0 (1e-50) would otherwise keep no token at all."""
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
    kth = jnp.take_along_axis(ordered, jnp.clip(sb.top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = (mass_before < sb.top_p[:, None]) | (sb.top_p[:, None] >= 1)
    nucleus_min = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    min_p_floor = ordered[:, :1] + jnp.log(jnp.maximum(sb.min_p, 1e-30))[:, None]
    threshold = jnp.maximum(jnp.maximum(kth, nucleus_min), jnp.where(sb.min_p[:, None] > 0, min_p_floor, -jnp.inf))
    threshold = jnp.minimum(threshold, ordered[:, :1])  # never above the most likely token
    cuts = ((sb.top_k < vocab) | (sb.top_p < 1) | (sb.min_p > 0))[:, None]
    return jnp.where(cuts & (logits < threshold), -jnp.inf, logits)


def _draw(logits, sb: SamplingBatch, block: int = 256):
    """Inverse-CDF sampling: one uniform per row (keyed by seed and counter) against the row's
    cumulative probabilities; one random number per row instead of V (Gumbel-max draws V, which
    costs more than the whole forward pass on a CPU). The CDF is taken in two levels, over blocks
    of `block` tokens and then inside the chosen block, so no scan runs the length of V."""

    def uniform(seed, counter):
        return jax.random.uniform(jax.random.fold_in(jax.random.key(seed), counter), dtype=jnp.float32)

    rows, vocab = logits.shape
    u = jax.vmap(uniform)(sb.seeds, sb.counters)  # [R]
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # unnormalised; masked tokens 0
    probs = jnp.pad(probs, ((0, 0), (0, -vocab % block))).reshape(rows, -1, block)
    cum = jnp.cumsum(jnp.sum(probs, axis=-1), axis=-1)  # [R, V / block]
    target = u * cum[:, -1]
    chosen = jnp.minimum(jnp.sum(cum <= target[:, None], axis=-1), cum.shape[1] - 1)  # first block past target
    inside = jnp.take_along_axis(probs, chosen[:, None, None], axis=1)[:, 0]  # [R, block]
    before = jnp.where(chosen > 0, jnp.take_along_axis(cum, jnp.maximum(chosen - 1, 0)[:, None], axis=1)[:, 0], 0.0)
    offset = jnp.sum(before[:, None] + jnp.cumsum(inside, axis=-1) <= target[:, None], axis=-1)
    # Rounding may leave the target past the block's last token: take its last possible one.
    last = jnp.max(jnp.where(inside > 0, jnp.arange(block), 0), axis=-1)
    return (chosen * block + jnp.minimum(offset, last)).astype(jnp.int32)


def apply_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """-inf where the row's bit is 0. logits [R, V], bitmask [R, ceil(V / 32)] i32."""
    rows, vocab = logits.shape
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [R, W, 32]
    allowed = bits.reshape(rows, -1)[:, :vocab].astype(jnp.bool_)
    return jnp.where(allowed, logits, -jnp.inf)


def top_logprobs(logprobs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The MAX_LOGPROBS most likely ids [R, k] and logprobs, padded with id -1 if V is smaller."""
    k = min(MAX_LOGPROBS, logprobs.shape[-1])
    vals, ids = jax.lax.top_k(logprobs, k)
    pad = ((0, 0), (0, MAX_LOGPROBS - k))
    return jnp.pad(ids.astype(jnp.int32), pad, constant_values=-1), jnp.pad(vals, pad, constant_values=-jnp.inf)


def sample(
    logits: jax.Array,  # [R, V] f32
    sb: SamplingBatch,
    penalties: PenaltyState,
    bias: LogitBias,
    processors: Sequence[LogitsProcessor] = (),
    *,
    full: bool = True,
    bitmask: jax.Array | None = None,  # [R, ceil(V / 32)] i32; None: no grammar in this program
) -> SamplerOutput:
    """full=False leaves out what sorts the vocabulary: the top_k/top_p/min_p cut (the rows' own
    parameters must not ask for it) and the top logprobs (returned as zeros)."""
    num_rows, vocab = logits.shape
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    x = logits
    for i, proc in enumerate(processors):
        x = jnp.where(sb.processor_mask[i][:, None], proc(x), x)
    x = _apply_penalties(x, penalties, sb)  # neutral for rows without a penalty row
    x = _apply_bias(x, bias, sb)
    if bitmask is not None:
        x = apply_bitmask(x, bitmask)
    greedy_tokens = jnp.argmax(x, axis=-1).astype(jnp.int32)

    is_sampled = sb.temperature > 0
    x = x / jnp.where(is_sampled, sb.temperature, 1.0)[:, None]
    if full:
        x = _truncate(x, sb)
    tokens = jnp.where(is_sampled, _draw(x, sb), greedy_tokens)

    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    ranks = (1 + jnp.sum(logprobs > chosen[:, None], axis=-1)).astype(jnp.int32)
    if full:
        top_ids, top_vals = top_logprobs(logprobs)
    else:
        top_ids = jnp.zeros((num_rows, MAX_LOGPROBS), jnp.int32)
        top_vals = jnp.zeros((num_rows, MAX_LOGPROBS), jnp.float32)
    return SamplerOutput(tokens, chosen, ranks, top_ids, top_vals)
