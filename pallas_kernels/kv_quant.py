"""FP8 KV pages: the formats, and the one rule for storing into and reading from them.

    k_new [T, K, H] (model dtype) --quantize(x, scale, dtype)--> pages [P, S, K, H] (fp8)
        x / scale, saturated to the format's largest finite value, rounded to nearest
    pages --dequantize(x, scale)--> f32:  x * scale

A scale is one f32 per layer for K and one for V. The kernels fold them where that is cheaper than
touching each element: the K scale into the scores (q . (k * s) = (q . k) * s), the V scale into
the output (sum p (v * s) = (sum p v) * s).
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
