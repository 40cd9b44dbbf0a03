"""The Mosaic GPU K/V page writer against the XLA scatter, in Pallas GPU interpret mode on the CPU:
random slots over scattered pages, padding tokens (slots past the cache, and negative) dropped,
every other page row left as it was; token counts that the block size does not divide."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import write_kv_pages, write_kv_pages_reference


@pytest.mark.parametrize(
    "num_tokens,tokens_per_block,dtype", [(13, 32, np.float32), (48, 32, ml_dtypes.bfloat16), (40, 8, np.float32)]
)
def test_writer_matches_scatter(num_tokens, tokens_per_block, dtype):
    rng = np.random.default_rng(num_tokens)
    pages, page_size, kv_heads, head_dim = 12, 16, 2, 64
    shape = (pages, page_size, kv_heads, head_dim)
    k_pages, v_pages = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    k_new, v_new = (rng.standard_normal((num_tokens, kv_heads, head_dim)).astype(dtype) for _ in range(2))
    slots = rng.permutation(pages * page_size)[:num_tokens].astype(np.int32)
    slots[1] = pages * page_size  # padding tokens: never written
    slots[-1] = pages * page_size + 77
    slots[num_tokens // 2] = -1
    out = write_kv_pages(k_pages, v_pages, k_new, v_new, slots, tokens_per_block=tokens_per_block, interpret=True)
    ref = write_kv_pages_reference(k_pages, v_pages, k_new, v_new, slots)
    for o, r, before in zip(out, ref, (k_pages, v_pages)):
        o, r = np.asarray(o), np.asarray(r)
        np.testing.assert_array_equal(o, r)
        assert np.any(o != before)
        untouched = np.ones(pages * page_size, bool)
        untouched[slots[(slots >= 0) & (slots < pages * page_size)]] = False
        flat = lambda a: a.reshape(pages * page_size, -1)  # noqa: E731
        np.testing.assert_array_equal(flat(o)[untouched], flat(before)[untouched])


def test_writer_lowers_for_hopper():
    sd = jax.ShapeDtypeStruct
    pages = sd((64, 64, 8, 128), jnp.bfloat16)
    rows = sd((256, 8, 128), jnp.bfloat16)
    text = (
        jax.jit(functools.partial(write_kv_pages), donate_argnums=(0, 1))
        .trace(pages, pages, rows, rows, sd((256,), jnp.int32))
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    assert "mosaic_gpu" in text


def test_writer_bad_inputs_are_named():
    k = np.zeros((4, 16, 2, 64), np.float32)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_pages(
            k,
            k,
            np.zeros((3, 2, 64), np.float32),
            np.zeros((3, 2, 64), np.float32),
            np.zeros(4, np.int32),
            interpret=True,
        )
