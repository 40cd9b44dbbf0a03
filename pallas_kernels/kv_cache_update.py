"""Writing one step's new K/V rows into their cache pages.

    k_pages, v_pages [P, S, K, H]   one layer's pages (updated in place when donated)
    k_new, v_new     [T, K, H]      this step's keys and values, one row per token
    slot_mapping     [T] int32      flat slot page * S + offset of each token; padding tokens carry
                                    a slot >= P * S and are dropped, never written

This file holds the pure-jnp reference (an XLA scatter); a Pallas kernel may plug in beside it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_inputs(k_pages, v_pages, k_new, v_new, slot_mapping) -> None:
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages and v_pages must both be [P, S, K, H], got {k_pages.shape} and {v_pages.shape}")
    if k_new.shape != v_new.shape or k_new.ndim != 3 or k_new.shape[1:] != k_pages.shape[2:]:
        raise ValueError(f"k_new and v_new must be [T, K, H] = [T, *{k_pages.shape[2:]}], got {k_new.shape}, {v_new.shape}")
    if slot_mapping.shape != k_new.shape[:1] or slot_mapping.dtype != jnp.int32:
        raise ValueError(f"slot_mapping must be int32 [T] = [{k_new.shape[0]}], got {slot_mapping.dtype} {slot_mapping.shape}")


def write_kv_pages_reference(k_pages, v_pages, k_new, v_new, slot_mapping):
    """Scatters each token's K/V row to its slot; out-of-range slots (padding) are dropped."""
    check_inputs(k_pages, v_pages, k_new, v_new, slot_mapping)
    k_pages, v_pages, k_new, v_new, slot_mapping = map(jnp.asarray, (k_pages, v_pages, k_new, v_new, slot_mapping))
    num_pages, page_size, num_kv_heads, head_dim = k_pages.shape

    def scatter(pages, new):
        flat = pages.reshape(num_pages * page_size, num_kv_heads, head_dim)
        flat = flat.at[slot_mapping].set(new.astype(pages.dtype), mode="drop")
        return flat.reshape(pages.shape)

    return scatter(k_pages, k_new), scatter(v_pages, v_new)
