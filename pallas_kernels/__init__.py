"""Attention kernels over a paged KV cache, each beside its pure-jnp reference.

    q, new K/V, page tables -> kv_cache_update (scatter into pages) -> ragged_paged_attention -> out

Imports only JAX. `models.attention` picks an implementation by name; the references define
the semantics every kernel is tested against. Kernels are Mosaic GPU (Hopper, sm_90); their tests
run the same kernel bodies in Pallas GPU interpret mode on the CPU. Pages may be fp8 with a scale
for K and one for V (`kv_quant`: the writers quantize, the attention functions dequantize).
"""

from pallas_kernels.kv_cache_update import write_kv_pages, write_kv_pages_reference
from pallas_kernels.ragged_paged_attention import config_for, ragged_paged_attention
from pallas_kernels.ragged_paged_attention_config import RaggedPagedAttentionConfig
from pallas_kernels.ragged_paged_attention_reference import ragged_paged_attention_reference

__all__ = [
    "RaggedPagedAttentionConfig",
    "config_for",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "write_kv_pages",
    "write_kv_pages_reference",
]
