"""FP8 KV pages: the formats, and the one rule for storing into and reading from them.

    k_new [T, K, H] (model dtype) --quantize(x, scale, dtype)--> pages [P, S, K, H] (fp8)
        x / scale, saturated to the format's largest finite value, rounded to nearest
    pages --dequantize(x, scale)--> f32:  x * scale

A scale is one f32 per layer for K and one for V. The kernels fold them where that is cheaper than
touching each element: the K scale into the scores (q . (k * s) = (q . k) * s), the V scale into
the output (sum p (v * s) = (sum p v) * s).

    q [T, N, H] --quantize_q(q, valid)--> (q8 e4m3, q_scale): the ragged paged attention kernel's
        fp8 Q.K^T (`fp8_qk`), one scale a call from the live tokens
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FP8_DTYPES = (jnp.float8_e4m3fn, jnp.float8_e5m2)


def is_fp8(dtype) -> bool:
    return jnp.dtype(dtype) in tuple(map(jnp.dtype, FP8_DTYPES))


def quantize(x: jax.Array, scale, dtype) -> jax.Array:
    """x / scale cast to `dtype`; fp8 saturates at its largest finite value (e4m3 has no inf: an
    unsaturated overflow would be NaN). Other dtypes are a plain cast (scale 1 expected)."""
    if not is_fp8(dtype):
        return x.astype(dtype)
    top = float(jnp.finfo(dtype).max)
    scaled = x.astype(jnp.float32) / jnp.asarray(scale, jnp.float32)
    return jnp.clip(scaled, -top, top).astype(dtype)


def dequantize(x: jax.Array, scale) -> jax.Array:
    """The f32 values stored pages stand for."""
    return x.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)


def quantize_q(q: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """q [T, N, H] -> (q / q_scale as float8_e4m3fn, q_scale [] f32): one scale, from the live tokens'
    (valid [T]) largest |q|; padding tokens' values must not set it. Per (token, head) scales would
    buy little: fp8 has an exponent, so every value within 448 / 2^-6 (~2^15) of the largest rounds
    to the same <= 2^-4 relative error whatever the scale, and a row further below has scores too
    small to move its softmax (tests/kernels/test_fp8_qk.py measured per-row scales no better)."""
    amax = jnp.max(jnp.where(valid[:, None, None], jnp.abs(q.astype(jnp.float32)), 0.0))
    top = float(jnp.finfo(jnp.float8_e4m3fn).max)
    q_scale = jnp.maximum(amax / top, jnp.finfo(jnp.float32).tiny)  # floored after the division: no 0 / 0 at q = 0
    return quantize(q, q_scale, jnp.float8_e4m3fn), q_scale
