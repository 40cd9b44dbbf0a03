"""The one attention interface of the models: a flat ragged batch over a paged KV cache.

The engine stages a step as one flat batch of T tokens drawn from R sequences (padded to a
bucket) and passes it down unchanged to every layer:

    tokens       [T]        (to the model)        token ids, sequences back to back
    positions    [T]        RaggedBatch           rope position of each token
    slot_mapping [T]        RaggedBatch           cache slot page * S + offset to write its K/V
    cu_q_lens    [R+1]      RaggedBatch           sequence r owns tokens cu_q_lens[r] : cu_q_lens[r+1]
    kv_lens      [R]        RaggedBatch           tokens cached per sequence after this step
    page_table   [R, P_max] RaggedBatch           the pages of each sequence, in order
    num_seqs     [1]        RaggedBatch           live sequences; the rest are padding rows

Each layer writes its new K/V into the pages, then attends: `paged_attention` dispatches by name
to an implementation:
    "reference"  pure jnp, gathers all P_max pages per token: the spec, simple and slow
    "xla"        plain XLA, loops over the pages actually in use with an online softmax: the
                 portable path (CPU)
    "pallas"     the Mosaic GPU kernel on a GPU; elsewhere the same kernel body in Pallas GPU
                 interpret mode, for tests
"reference" and "xla" write the new K/V with the XLA scatter `write_kv_pages_reference`, "pallas" with the
Mosaic GPU writer `write_kv_pages` (both in place when donated).
KV cache layout: per layer, k and v pages [P, S, K, H]; the kernel reads one head's [S, H] slice of
a page per TMA copy. Pages are the model's dtype or fp8 (float8_e4m3fn / float8_e5m2): then they
hold K / k_scale and V / v_scale, saturated (`pallas_kernels.kv_quant`), with one f32 scale per
layer for K and one for V carried beside the pages: 1.0 (vLLM's default), or, with
`estimate_scales` (vLLM's --calculate-kv-scales), 0 until the first step that writes K/V sets them
from its own values (amax / 200 for K, amax / 100 for V, vLLM's constants), fixed from then on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels import (
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv_pages,
    write_kv_pages_reference,
)
from pallas_kernels.ragged_paged_attention_xla import ragged_paged_attention_xla


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RaggedBatch:
    positions: jax.Array  # [T] int32
    slot_mapping: jax.Array  # [T] int32, padding tokens -> a slot >= P * S (dropped)
    cu_q_lens: jax.Array  # [R+1] int32
    kv_lens: jax.Array  # [R] int32
    page_table: jax.Array  # [R, P_max] int32
    num_seqs: jax.Array  # [1] int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKVCache:
    k: jax.Array  # [P, S, K, H]
    v: jax.Array  # [P, S, K, H]
    k_scale: jax.Array  # [] f32: k holds K / k_scale
    v_scale: jax.Array  # [] f32: v holds V / v_scale
    # Static: the scales start at 0 and the first step that writes K/V sets them (`estimate_kv_scales`).
    estimate_scales: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def with_pages(self, k: jax.Array, v: jax.Array) -> LayerKVCache:
        return dataclasses.replace(self, k=k, v=v)


# --calculate-kv-scales, as vLLM estimates them: scale = amax / constant, which leaves e4m3 (max 448)
# 2.2x headroom for K and 4.5x for V beyond the first step's largest value.
K_SCALE_CONSTANT, V_SCALE_CONSTANT = 200.0, 100.0


KVCache = list[LayerKVCache]  # one entry per layer


def allocate_kv_cache(
    num_layers: int,
    num_pages: int,
    page_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype,
    sharding=None,
    *,
    estimate_scales: bool = False,
) -> KVCache:
    """Zeroed pages of `dtype` (the model's, or fp8) and scales 1.0 (0 to be estimated), created on
    the device(s) directly (jit with out_shardings, no host copy). sharding: the pages'
    (`kv_cache_shardings`)."""
    shape = (num_pages, page_size, num_kv_heads, head_dim)

    def zeros():
        scale = jnp.full((), 0.0 if estimate_scales else 1.0, jnp.float32)
        return [
            LayerKVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), scale, scale, estimate_scales)
            for _ in range(num_layers)
        ]

    jit_kwargs = (
        {} if sharding is None else {"out_shardings": kv_cache_shardings(num_layers, sharding, estimate_scales)}
    )
    return jax.jit(zeros, **jit_kwargs)()


def kv_cache_shardings(num_layers: int, page_sharding, estimate_scales: bool = False) -> KVCache:
    """The cache's placement, leaf by leaf: pages as `page_sharding`, scales replicated."""
    scale = jax.sharding.NamedSharding(page_sharding.mesh, jax.sharding.PartitionSpec())
    return [LayerKVCache(page_sharding, page_sharding, scale, scale, estimate_scales) for _ in range(num_layers)]


def estimate_kv_scales(cache: LayerKVCache, k: jax.Array, v: jax.Array, batch: RaggedBatch) -> LayerKVCache:
    """With `cache.estimate_scales`: the cache with its scales set from this step's K/V if they
    are unset (0) and the step writes any token (padding tokens, whose slots are past the pages,
    do not count); a set scale stays. Device-side selects, no conditional: the host never waits
    for it. Call it on the whole K/V, before any per-shard map: under tensor parallelism the amax
    must cover every kv head, or each device would fix a scale of its own. Without the flag: the
    cache as it is."""
    if not cache.estimate_scales:
        return cache
    num_slots = cache.k.shape[0] * cache.k.shape[1]
    real = (batch.slot_mapping < num_slots)[:, None, None]  # [T, 1, 1]
    writes = jnp.any(real)

    def scale(current, x, constant):
        amax = jnp.max(jnp.where(real, jnp.abs(x.astype(jnp.float32)), 0.0))
        estimate = jnp.where(amax > 0, amax / constant, 1.0)  # all zeros: any scale holds them
        return jnp.where(current > 0, current, jnp.where(writes, estimate, 0.0))

    return dataclasses.replace(
        cache, k_scale=scale(cache.k_scale, k, K_SCALE_CONSTANT), v_scale=scale(cache.v_scale, v, V_SCALE_CONSTANT)
    )


AttentionImpl = Callable[..., tuple[jax.Array, LayerKVCache]]


def _after_scatter(attend) -> AttentionImpl:
    """An implementation that writes the new K/V with the XLA scatter, then calls `attend`."""

    def impl(q, k, v, cache: LayerKVCache, batch: RaggedBatch, *, sm_scale: float):
        scales = dict(k_scale=cache.k_scale, v_scale=cache.v_scale)
        k_pages, v_pages = write_kv_pages_reference(cache.k, cache.v, k, v, batch.slot_mapping, **scales)
        out = attend(
            q,
            k_pages,
            v_pages,
            batch.kv_lens,
            batch.page_table,
            batch.cu_q_lens,
            batch.num_seqs,
            sm_scale=sm_scale,
            **scales,
        )
        return out, cache.with_pages(k_pages, v_pages)

    return impl


def _pallas(q, k, v, cache: LayerKVCache, batch: RaggedBatch, *, sm_scale: float):
    interpret = jax.default_backend() != "gpu"
    k_pages, v_pages = write_kv_pages(
        cache.k, cache.v, k, v, batch.slot_mapping, cache.k_scale, cache.v_scale, interpret=interpret
    )
    out = ragged_paged_attention(
        q,
        k_pages,
        v_pages,
        batch.kv_lens,
        batch.page_table,
        batch.cu_q_lens,
        batch.num_seqs,
        cache.k_scale,
        cache.v_scale,
        sm_scale=sm_scale,
        interpret=interpret,
    )
    return out, cache.with_pages(k_pages, v_pages)


ATTENTION_IMPLS: dict[str, AttentionImpl] = {
    "reference": _after_scatter(ragged_paged_attention_reference),
    "xla": _after_scatter(ragged_paged_attention_xla),
    "pallas": _pallas,
}


def paged_attention(
    q: jax.Array,  # [T, N, H]
    k: jax.Array,  # [T, K, H]
    v: jax.Array,  # [T, K, H]
    cache: LayerKVCache,
    batch: RaggedBatch,
    *,
    sm_scale: float,
    impl: str = "reference",
) -> tuple[jax.Array, LayerKVCache]:  # out [T, N, H], the layer's cache with this step's K/V
    try:
        fn = ATTENTION_IMPLS[impl]
    except KeyError:
        raise ValueError(f"unknown attention implementation {impl!r}; known: {sorted(ATTENTION_IMPLS)}") from None
    return fn(q, k, v, cache, batch, sm_scale=sm_scale)
