"""--calculate-kv-scales at the attention layer: with `estimate_scales`, a layer's fp8 K/V scales
start at 0 and the first step that writes a real token sets them to amax / 200 (K) and amax / 100
(V) of that step's real tokens; later steps keep them, and the pages hold K / k_scale."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import (
    K_SCALE_CONSTANT,
    V_SCALE_CONSTANT,
    RaggedBatch,
    allocate_kv_cache,
    estimate_kv_scales,
    paged_attention,
)

PAGES, S, K, H, G = 8, 16, 2, 64, 2


def batch(kv_lens: list[int], q_lens: list[int], pad: int) -> RaggedBatch:
    """q_lens new tokens of each sequence (at its end) then `pad` padding tokens; a page each.
    No sequence: one padding row (num_seqs 0), as the engine's empty warm-up steps."""
    num_seqs = len(kv_lens)
    if not kv_lens:
        kv_lens, q_lens = [0], [0]
    slots, positions = [], []
    for r, (kv, q) in enumerate(zip(kv_lens, q_lens)):
        positions += list(range(kv - q, kv))
        slots += [r * S + p for p in range(kv - q, kv)]
    positions += [0] * pad
    slots += [PAGES * S] * pad  # past the pages: dropped
    table = np.arange(len(kv_lens), dtype=np.int32)[:, None]
    return RaggedBatch(
        positions=jnp.asarray(positions, jnp.int32),
        slot_mapping=jnp.asarray(slots, jnp.int32),
        cu_q_lens=jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32),
        kv_lens=jnp.asarray(kv_lens, jnp.int32),
        page_table=jnp.asarray(table),
        num_seqs=jnp.asarray([num_seqs], jnp.int32),
    )


def step(cache, b: RaggedBatch, k, v, impl):
    """What a model layer does: estimate (a no-op without the flag), then attend and write."""
    q = jax.random.normal(jax.random.key(9), (k.shape[0], K * G, H), jnp.float32)

    def layer(c, k, v):
        return paged_attention(q, k, v, estimate_kv_scales(c, k, v, b), b, sm_scale=H**-0.5, impl=impl)

    return jax.jit(layer)(cache, k, v)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("fmt", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_first_writing_step_sets_the_scales_then_they_stay(impl, fmt):
    (cache,) = allocate_kv_cache(1, PAGES, S, K, H, fmt, estimate_scales=True)
    assert float(cache.k_scale) == float(cache.v_scale) == 0.0
    keys = jax.random.split(jax.random.key(0), 4)

    # a step of padding alone (warm-up runs these) writes nothing: the scales stay unset
    k, v = (jax.random.normal(key, (4, K, H)) * 1e3 for key in keys[:2])
    _, cache = step(cache, batch([], [], pad=4), k, v, impl)
    assert float(cache.k_scale) == float(cache.v_scale) == 0.0

    # the first real step: 5 + 3 tokens of two sequences, 2 padding tokens far larger (not counted)
    k = jax.random.normal(keys[2], (10, K, H)) * 3.0
    v = jax.random.normal(keys[3], (10, K, H)) * 0.5
    k, v = k.at[8:].set(1e4), v.at[8:].set(-1e4)
    b = batch([5, 3], [5, 3], pad=2)
    out, cache = step(cache, b, k, v, impl)
    k_scale = float(jnp.max(jnp.abs(k[:8]))) / K_SCALE_CONSTANT
    v_scale = float(jnp.max(jnp.abs(v[:8]))) / V_SCALE_CONSTANT
    np.testing.assert_allclose([float(cache.k_scale), float(cache.v_scale)], [k_scale, v_scale], rtol=1e-6)
    # the pages hold K / k_scale: dequantized, within the format's precision of K
    stored = cache.k[0, :5].astype(jnp.float32) * cache.k_scale
    np.testing.assert_allclose(stored, k[:5], rtol=0.13 if fmt == jnp.float8_e5m2 else 0.07, atol=1e-6)
    assert bool(jnp.all(jnp.isfinite(out)))

    # a later step, larger values: the scales do not move (pages written before stay readable)
    _, cache = step(cache, batch([6, 4], [1, 1], pad=0), k[:2] * 10, v[:2] * 10, impl)
    np.testing.assert_allclose([float(cache.k_scale), float(cache.v_scale)], [k_scale, v_scale], rtol=1e-6)


def test_without_estimate_the_scales_are_one_and_stay():
    (cache,) = allocate_kv_cache(1, PAGES, S, K, H, jnp.float8_e4m3fn)
    k = jax.random.normal(jax.random.key(1), (5, K, H)) * 30
    _, cache = step(cache, batch([5], [5], pad=0), k, k, "xla")
    assert float(cache.k_scale) == float(cache.v_scale) == 1.0 and not cache.estimate_scales
