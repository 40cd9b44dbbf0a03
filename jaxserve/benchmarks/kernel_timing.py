"""Timing a kernel call on the device, and its error against a reference (kernel scripts)."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def time_chained(fn, args, lens_index: int, calls: int) -> float:
    """Median seconds per call of `calls` calls of fn(*args) chained in one jit: each call's
    args[lens_index] (the kv lengths) depends on the last output through a 0 XLA cannot know, so
    nothing is hoisted or merged."""

    def chain(*args):
        args, out = list(args), None
        for _ in range(calls):
            if out is not None:
                args[lens_index] = args[lens_index] + (out.reshape(-1)[0].astype(jnp.float32) > 3e38).astype(jnp.int32)
            out = fn(*args)
        return out

    run = jax.jit(chain)
    jax.block_until_ready(run(*args))
    jax.block_until_ready(run(*args))
    times = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(run(*args))
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times)


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| (Frobenius, in f64); nan if out holds a non-finite value."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref)) if np.all(np.isfinite(out)) else float("nan")
