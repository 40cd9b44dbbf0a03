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
                args[lens_index] = args[lens_index] + _unknown_zero(out, jnp.int32)
            out = fn(*args)
        return out

    return _seconds_per_call(jax.jit(chain), args, calls)


def time_rotating(fn, x, operand_sets, repeats: int = 5) -> float:
    """Median seconds per call of fn(x, *operand_sets[i]) for every i, chained in one jit as
    time_chained chains (x carries the unknown 0). Each operand set is used once per run, so XLA
    cannot share work on it between calls (a weight's convert, say), and, given sets whose bytes
    add up to several times the L2 cache, no call finds its operands still cached. fn is jitted
    first, so it is traced and lowered once however many calls the chain has."""
    fn = jax.jit(fn)

    def chain(x, *sets):
        out = None
        for operands in sets:
            if out is not None:
                x = x + _unknown_zero(out, x.dtype)
            out = fn(x, *operands)
        return out

    return _seconds_per_call(jax.jit(chain), (x, *operand_sets), len(operand_sets), repeats)


def _unknown_zero(out, dtype):
    """0, computed from `out` (its first value is never above 3e38), so the next call waits for it."""
    return (out.reshape(-1)[0].astype(jnp.float32) > 3e38).astype(dtype)


def _seconds_per_call(run, args, calls: int, repeats: int = 5) -> float:
    """Median over `repeats` timed runs of run(*args) (after two untimed), divided by `calls`."""
    jax.block_until_ready(run(*args))
    jax.block_until_ready(run(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(run(*args))
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times)


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| (Frobenius, in f64); nan if out holds a non-finite value."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref)) if np.all(np.isfinite(out)) else float("nan")


def max_rel_err(out, ref) -> float:
    """max |out - ref| / max |ref| (in f64); nan if out holds a non-finite value."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref))) if np.all(np.isfinite(out)) else float("nan")
