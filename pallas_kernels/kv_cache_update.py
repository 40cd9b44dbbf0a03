"""Writing one step's new K/V rows into their cache pages.

    k_pages, v_pages [P, S, K, H]   one layer's pages (updated in place when donated)
    k_new, v_new     [T, K, H]      this step's keys and values, one row per token
    slot_mapping     [T] int32      flat slot page * S + offset of each token; padding tokens carry
                                    a slot outside [0, P * S) and are dropped, never written
    k_scale, v_scale []  f32        fp8 pages store k_new / k_scale, saturated (`kv_quant.quantize`)

Two implementations of the same function: `write_kv_pages` (Mosaic GPU: each program stages a
few tokens' K and V rows in shared memory with one TMA load each, then stores every row to its
page slot with one TMA store of [K, H]) and `write_kv_pages_reference` (an XLA scatter). The
pages are aliased input -> output, so under a donating jit both write in place. Both quantize the
new rows first (one elementwise pass over [T, K, H], fused by XLA into the rows' producer): the
kernel then moves fp8 bytes, half of bf16's.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.kv_quant import quantize


def check_inputs(k_pages, v_pages, k_new, v_new, slot_mapping) -> None:
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages and v_pages must both be [P, S, K, H], got {k_pages.shape} and {v_pages.shape}")
    if k_new.shape != v_new.shape or k_new.ndim != 3 or k_new.shape[1:] != k_pages.shape[2:]:
        raise ValueError(
            f"k_new and v_new must be [T, K, H] = [T, *{k_pages.shape[2:]}], got {k_new.shape}, {v_new.shape}"
        )
    if slot_mapping.shape != k_new.shape[:1] or slot_mapping.dtype != jnp.int32:
        raise ValueError(
            f"slot_mapping must be int32 [T] = [{k_new.shape[0]}], got {slot_mapping.dtype} {slot_mapping.shape}"
        )


def _write_kernel(slot_ref, k_new_ref, v_new_ref, k_out, v_out, *, tokens_per_block, page_size, num_slots):
    row_block = (tokens_per_block, *k_new_ref.shape[1:])
    pl.run_scoped(
        functools.partial(
            _write_block,
            slot_ref,
            k_new_ref,
            v_new_ref,
            k_out,
            v_out,
            tokens_per_block=tokens_per_block,
            page_size=page_size,
            num_slots=num_slots,
        ),
        plgpu.SMEM(row_block, k_new_ref.dtype),
        plgpu.SMEM(row_block, v_new_ref.dtype),
        plgpu.Barrier(num_arrivals=2, num_barriers=1),
    )


def _write_block(
    slot_ref, k_new_ref, v_new_ref, k_out, v_out, k_smem, v_smem, loaded, *, tokens_per_block, page_size, num_slots
):
    base = lax.axis_index("b") * tokens_per_block
    plgpu.copy_gmem_to_smem(k_new_ref.at[pl.ds(base, tokens_per_block)], k_smem, loaded.at[0])
    plgpu.copy_gmem_to_smem(v_new_ref.at[pl.ds(base, tokens_per_block)], v_smem, loaded.at[0])
    plgpu.barrier_wait(loaded.at[0])
    for j in range(tokens_per_block):
        slot = slot_ref[base + j]

        @pl.when((slot >= 0) & (slot < num_slots))
        def _store(j=j, slot=slot):
            page, offset = slot // page_size, slot % page_size
            plgpu.copy_smem_to_gmem(k_smem.at[j], k_out.at[page, offset])
            plgpu.copy_smem_to_gmem(v_smem.at[j], v_out.at[page, offset])

    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("tokens_per_block", "interpret"))
def write_kv_pages(
    k_pages,
    v_pages,
    k_new,
    v_new,
    slot_mapping,
    k_scale=1.0,
    v_scale=1.0,
    *,
    tokens_per_block: int = 32,
    interpret: bool = False,
):
    """The Mosaic GPU writer (Hopper; `interpret=True` runs it on the CPU). tokens_per_block is
    reduced to a divisor of T (32 was faster than 8 at 256 and 2048 tokens on an H200,
    docs/benchmarks.md). -> (k_pages, v_pages)."""
    check_inputs(k_pages, v_pages, k_new, v_new, slot_mapping)
    k_new, v_new = quantize(k_new, k_scale, k_pages.dtype), quantize(v_new, v_scale, v_pages.dtype)
    num_pages, page_size, num_kv_heads, head_dim = k_pages.shape
    num_tokens = k_new.shape[0]
    if num_tokens == 0:
        return k_pages, v_pages
    if (num_kv_heads * head_dim * k_pages.dtype.itemsize) % 16:
        raise ValueError("a token's K row (K * H elements) must be a multiple of 16 bytes for TMA")
    tb = math.gcd(num_tokens, tokens_per_block)
    call = plgpu.kernel(
        functools.partial(_write_kernel, tokens_per_block=tb, page_size=page_size, num_slots=num_pages * page_size),
        out_type=(),
        grid=(num_tokens // tb,),
        grid_names=("b",),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    # The pages go in as mutable refs: the kernel writes them in place (in/out aliased once
    # discharged), so a donating caller pays for the written rows only.
    k_ref, v_ref = jax.new_ref(k_pages), jax.new_ref(v_pages)
    call(slot_mapping, k_new, v_new, k_ref, v_ref)
    return jax.freeze(k_ref), jax.freeze(v_ref)


def write_kv_pages_reference(k_pages, v_pages, k_new, v_new, slot_mapping, k_scale=1.0, v_scale=1.0):
    """Scatters each token's K/V row (quantized) to its slot; out-of-range slots (padding) are dropped."""
    check_inputs(k_pages, v_pages, k_new, v_new, slot_mapping)
    k_pages, v_pages, k_new, v_new, slot_mapping = map(jnp.asarray, (k_pages, v_pages, k_new, v_new, slot_mapping))
    num_pages, page_size, num_kv_heads, head_dim = k_pages.shape

    def scatter(pages, new, scale):
        flat = pages.reshape(num_pages * page_size, num_kv_heads, head_dim)
        slots = jnp.where(slot_mapping < 0, num_pages * page_size, slot_mapping)  # negative: dropped, not wrapped
        flat = flat.at[slots].set(quantize(new, scale, pages.dtype), mode="drop")
        return flat.reshape(pages.shape)

    return scatter(k_pages, k_new, k_scale), scatter(v_pages, v_new, v_scale)
