"""Where arrays live: a device mesh and the rules from the models' logical axes to it.

    models name each parameter's axes ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp")
        -> LOGICAL_RULES -> PartitionSpec over the mesh axis "tp" -> NamedSharding

Megatron-style tensor parallelism: q/k/v and gate/up split by heads and columns, o and down by
rows, embedding and lm_head by vocabulary; the KV cache split by kv head. Head counts that the
mesh does not divide are laid out by `head_layout` (kv heads repeated, or zero heads appended)
so that each device holds whole GQA groups; attention then runs per shard (`shard_over_heads`).
"""

from sharding.attention import shard_over_heads
from sharding.heads import HeadLayout, head_layout
from sharding.mesh import TP_AXIS, make_mesh
from sharding.rules import LOGICAL_RULES, kv_cache_sharding, logical_sharding

__all__ = [
    "HeadLayout",
    "LOGICAL_RULES",
    "TP_AXIS",
    "head_layout",
    "kv_cache_sharding",
    "logical_sharding",
    "make_mesh",
    "shard_over_heads",
]
