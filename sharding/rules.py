"""Logical axis names -> mesh axes."""

from __future__ import annotations

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.mesh import TP_AXIS

LOGICAL_RULES: dict[str, str | None] = {
    "vocab": TP_AXIS,
    "heads": TP_AXIS,
    "kv_heads": TP_AXIS,
    "mlp": TP_AXIS,
    "embed": None,
    "head_dim": None,
    "batch": None,  # an activation's rows or tokens: tensor parallelism never splits them
}


def logical_sharding(mesh: Mesh, logical_axes: tuple[str, ...], shape: tuple[int, ...] | None = None) -> NamedSharding:
    """The sharding of an array whose axes have these logical names. Given the shape, an axis that
    the mesh does not divide evenly is replicated instead (e.g. kv heads fewer than devices)."""
    spec = []
    for i, name in enumerate(logical_axes):
        if name not in LOGICAL_RULES:
            raise ValueError(f"no sharding rule for logical axis {name!r}")
        axis = LOGICAL_RULES[name]
        if axis is not None and shape is not None and shape[i] % mesh.shape[axis]:
            axis = None
        spec.append(axis)
    return NamedSharding(mesh, PartitionSpec(*spec))


def kv_cache_sharding(mesh: Mesh) -> NamedSharding:
    """KV pages [P, S, K, H] split by kv head."""
    return NamedSharding(mesh, PartitionSpec(None, None, LOGICAL_RULES["kv_heads"], None))
