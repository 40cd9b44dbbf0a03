"""One buffer per direction per step: a pytree of fixed-shape arrays laid out in one flat int32
array, so that staging a step is one host->device transfer and reading its result one
device->host transfer, instead of one per field (each costs tens of microseconds on a GPU).

    host:   Packing(template).new() -> (buffer int32 [W], pytree of numpy views into it)
            ... fill the views ... -> jit(step)(buffer)
    device: Packing(template).unpack(buffer) -> pytree of arrays (sliced and bitcast in the trace)
    device: Packing(template).pack(tree) -> buffer;  host: Packing.views(np.asarray(buffer))

Fields are 4-byte dtypes (int32, uint32, float32) or bool; a bool takes one int32 word (host
views of bool fields are int32: write True/False or 0/1). Each field starts on a 256-byte
boundary: XLA hands a field's slice to a kernel as a pointer into the buffer, and GPU kernels
(Mosaic GPU's among them) refuse inputs that are not 256-byte aligned.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ALIGN_WORDS = 64  # 256 bytes


@dataclasses.dataclass(frozen=True)
class _Field:
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class Packing:
    def __init__(self, template: Any):
        """template: a pytree whose leaves have .shape and .dtype (arrays or ShapeDtypeStructs)."""
        leaves, self.treedef = jax.tree.flatten(template)
        self.fields = []
        offset = 0
        for leaf in leaves:
            dtype = np.dtype(leaf.dtype)
            if dtype != np.bool_ and dtype.itemsize != 4:
                raise ValueError(f"only 4-byte dtypes and bool can be packed, got {dtype}")
            field = _Field(offset, tuple(leaf.shape), dtype)
            self.fields.append(field)
            offset += -(-field.size // ALIGN_WORDS) * ALIGN_WORDS
        self.num_words = offset

    def new(self) -> tuple[np.ndarray, Any]:
        """A zeroed host buffer and the pytree of writable views into it."""
        buffer = np.zeros(self.num_words, np.int32)
        return buffer, self.views(buffer)

    def views(self, buffer: np.ndarray) -> Any:
        leaves = []
        for f in self.fields:
            words = buffer[f.offset : f.offset + f.size]
            leaves.append((words if f.dtype == np.bool_ else words.view(f.dtype)).reshape(f.shape))
        return jax.tree.unflatten(self.treedef, leaves)

    def unpack(self, buffer: jax.Array) -> Any:
        """In a trace: the pytree, sliced out of the buffer with its dtypes restored."""
        leaves = []
        for f in self.fields:
            words = buffer[f.offset : f.offset + f.size].reshape(f.shape)
            if f.dtype == np.bool_:
                leaves.append(words != 0)
            elif f.dtype == np.int32:
                leaves.append(words)
            else:
                leaves.append(jax.lax.bitcast_convert_type(words, f.dtype))
        return jax.tree.unflatten(self.treedef, leaves)

    def pack(self, tree: Any) -> jax.Array:
        """In a trace: the pytree (matching the template) as one int32 buffer."""
        words = []
        for f, leaf in zip(self.fields, jax.tree.leaves(tree), strict=True):
            leaf = jnp.asarray(leaf).reshape(-1)
            if f.dtype in (np.bool_, np.int32):
                leaf = leaf.astype(jnp.int32)
            else:
                leaf = jax.lax.bitcast_convert_type(leaf.astype(f.dtype), jnp.int32)
            words.append(jnp.pad(leaf, (0, -(-f.size // ALIGN_WORDS) * ALIGN_WORDS - f.size)))
        return jnp.concatenate(words)
