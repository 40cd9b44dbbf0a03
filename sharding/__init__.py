"""Where arrays live: a device mesh and the rules from the models' logical axes to it.

    models name each parameter's axes ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp")
        -> LOGICAL_RULES -> PartitionSpec over the mesh axis "tp" -> NamedSharding

Megatron-style tensor parallelism: q/k/v and gate/up split by heads and columns, o and down by
rows, embedding and lm_head by vocabulary. Imports only JAX.
"""

from sharding.mesh import TP_AXIS, make_mesh
from sharding.rules import LOGICAL_RULES, logical_sharding

__all__ = ["LOGICAL_RULES", "TP_AXIS", "logical_sharding", "make_mesh"]
