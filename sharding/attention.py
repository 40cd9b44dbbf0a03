"""Attention per shard: each device attends with its own query heads and the kv heads they read.

    q, k, v [T, heads, H]      split on heads          -> fn on each device's slice
    KV pages [P, S, K, H]      split on kv heads
    ragged batch metadata      replicated

The head layout (sharding.heads) guarantees every device holds whole GQA groups, so the
attention function (reference, XLA or a Pallas kernel) runs unchanged on its shard.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import Mesh, PartitionSpec

from sharding.mesh import TP_AXIS


def shard_over_heads(fn: Callable, mesh: Mesh) -> Callable:
    """fn(q, k, v, cache, batch) -> (out, cache), run per shard over the mesh's "tp" axis. The
    cache's pages [P, S, K, H] split by kv head; its scalars (the fp8 scales) whole on each."""
    heads = PartitionSpec(None, TP_AXIS, None)
    pages = PartitionSpec(None, None, TP_AXIS, None)

    def run(q, k, v, cache, batch):
        cache_spec = jax.tree.map(lambda a: pages if a.ndim == 4 else PartitionSpec(), cache)
        return jax.shard_map(
            fn,
            mesh=mesh,
            in_specs=(heads, heads, heads, cache_spec, PartitionSpec()),
            out_specs=(heads, cache_spec),
            check_vma=False,
        )(q, k, v, cache, batch)

    return run
