"""The fixed plan of compiled shapes: token-count buckets x request-count buckets.

    tokens T: min_tokens times powers of token_growth (2) up to max_num_batched_tokens (and that maximum)
    rows   R: powers of four (row_growth) up to min(T, max_num_seqs) (and that maximum), for each T

A step with t tokens from r requests runs at the smallest (T >= t, R >= r) of the plan.
"""

from __future__ import annotations

import bisect
import dataclasses


def _ladder(start: int, factor: int, top: int) -> list[int]:
    values, v = [], start
    while v < top:
        values.append(v)
        v *= factor
    return values + [top]


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    token_buckets: tuple[int, ...]
    row_buckets: dict[int, tuple[int, ...]]  # T -> the R buckets compiled for it

    @classmethod
    def make(
        cls,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        min_tokens: int = 16,
        row_growth: int = 4,
        token_growth: int = 2,
    ) -> BucketPlan:
        """row_growth: the factor between row buckets; 0 compiles one row bucket per T (its
        maximum), trading padded rows for fewer compiled shapes (faster start-up). token_growth:
        the factor between token buckets; larger trades padded tokens for fewer shapes."""
        if token_growth < 2:
            raise ValueError(f"token_growth must be >= 2, got {token_growth}")
        tokens = tuple(_ladder(min(min_tokens, max_num_batched_tokens), token_growth, max_num_batched_tokens))
        top = {t: min(t, max_num_seqs) for t in tokens}
        rows = {t: (top[t],) if row_growth == 0 else tuple(_ladder(1, row_growth, top[t])) for t in tokens}
        return cls(tokens, rows)

    def pick(self, num_tokens: int, num_rows: int) -> tuple[int, int]:
        t = self.token_buckets[bisect.bisect_left(self.token_buckets, num_tokens)]
        while num_rows > self.row_buckets[t][-1]:  # more rows than this T allows: go up
            t = self.token_buckets[self.token_buckets.index(t) + 1]
        r_list = self.row_buckets[t]
        return t, r_list[bisect.bisect_left(r_list, num_rows)]

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(t, r) for t in self.token_buckets for r in self.row_buckets[t]]

    def describe(self) -> str:
        lines = [f"bucket plan: {len(self.shapes)} step shapes"]
        lines += [f"  T={t:>6}: R in {list(self.row_buckets[t])}" for t in self.token_buckets]
        return "\n".join(lines)
