"""Attention heads laid out for tensor parallelism.

Every device must hold whole query heads together with the kv heads they read. Given N query
heads, K kv heads (groups of G = N / K) and tp devices, the served model gets N' >= N query
heads and K' >= K kv heads, both multiples of tp, with N' / K' = G kept where possible:

    K >= tp, tp | K, tp | N      unchanged
    K <  tp, K | tp, tp | N      kv heads repeated tp / K times (K' = tp): device d holds kv head
                                 d // (tp / K) beside its N / tp query heads (vLLM's replication)
    otherwise (e.g. SmolLM2:     zero heads appended: K' = K rounded up to a multiple of tp,
    N = 9, K = 3, tp = 2, 4, 8)  N' = K' x G; a zero query head reads a zero kv head and its
                                 o_proj rows are zero, so the model computes the same function

`q_index[j]` / `kv_index[j]` name the original head behind served head j (-1: a zero head).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    q_index: tuple[int, ...]  # [N']
    kv_index: tuple[int, ...]  # [K']

    @property
    def is_identity(self) -> bool:
        return self.q_index == tuple(range(len(self.q_index))) and self.kv_index == tuple(range(len(self.kv_index)))


def head_layout(num_heads: int, num_kv_heads: int, tp: int) -> HeadLayout:
    group = num_heads // num_kv_heads
    if num_heads % tp == 0 and num_kv_heads % tp == 0:
        return HeadLayout(tuple(range(num_heads)), tuple(range(num_kv_heads)))
    if num_heads % tp == 0 and tp % num_kv_heads == 0:
        repeat = tp // num_kv_heads
        return HeadLayout(tuple(range(num_heads)), tuple(k // repeat for k in range(tp)))
    kv_padded = -(-num_kv_heads // tp) * tp
    q_index = tuple(range(num_heads)) + (-1,) * ((kv_padded - num_kv_heads) * group)
    kv_index = tuple(range(num_kv_heads)) + (-1,) * (kv_padded - num_kv_heads)
    return HeadLayout(q_index, kv_index)
