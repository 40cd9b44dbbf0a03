"""The packed step buffers: what the host writes into the views is what the trace unpacks, and
what the trace packs is what the host reads back, for every dtype a step carries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.engine.packing import Packing

TEMPLATE = {
    "ids": jax.ShapeDtypeStruct((5,), jnp.int32),
    "probs": jax.ShapeDtypeStruct((2, 3), jnp.float32),
    "seeds": jax.ShapeDtypeStruct((2,), jnp.uint32),
    "mask": jax.ShapeDtypeStruct((4,), jnp.bool_),
}


def test_host_views_round_trip_through_the_trace():
    packing = Packing(TEMPLATE)
    buffer, x = packing.new()
    assert buffer.shape == (4 * 64,) and buffer.dtype == np.int32  # each field on a 256-byte boundary
    x["ids"][:] = [1, -2, 3, 2**31 - 1, 0]
    x["probs"][:] = [[0.5, -np.inf, 1e-30], [3.25, 0, -7]]
    x["seeds"][:] = [2**32 - 1, 7]
    x["mask"][:] = [True, False, 1, 0]
    out = jax.jit(packing.unpack)(buffer)
    np.testing.assert_array_equal(out["ids"], x["ids"])
    np.testing.assert_array_equal(out["probs"], x["probs"])
    assert out["seeds"].dtype == jnp.uint32 and np.asarray(out["seeds"]).tolist() == [2**32 - 1, 7]
    assert out["mask"].dtype == jnp.bool_ and np.asarray(out["mask"]).tolist() == [True, False, True, False]


def test_packed_in_the_trace_read_on_the_host():
    packing = Packing(TEMPLATE)
    tree = {
        "ids": jnp.arange(5, dtype=jnp.int32),
        "probs": jnp.full((2, 3), -1.5, jnp.float32),
        "seeds": jnp.array([3, 2**32 - 2], jnp.uint32),
        "mask": jnp.array([0, 1, 1, 0], bool),
    }
    back = packing.views(np.asarray(jax.jit(packing.pack)(tree)))
    for name in tree:
        np.testing.assert_array_equal(back[name].astype(np.asarray(tree[name]).dtype), np.asarray(tree[name]))


def test_only_four_byte_dtypes_and_bool():
    with pytest.raises(ValueError, match="4-byte"):
        Packing({"x": jax.ShapeDtypeStruct((2,), jnp.bfloat16)})
