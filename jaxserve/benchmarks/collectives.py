"""The collectives of a compiled XLA program, read from its HLO text: what tensor parallelism sends
between devices in one step (scripts/count_collectives.py, and a test that no step gathers a weight).

    compiled.as_text() -> collectives(): (kind, dtype, shape, bytes, op name) of each all-reduce,
    all-gather, reduce-scatter, collective-permute and all-to-all (an asynchronous pair counted
    once, by its -start half)
"""

from __future__ import annotations

import dataclasses
import math
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
# `%name = bf16[16,2048]{1,0} all-reduce(...)`, or `... all-gather-start(...)`; a tuple of several
# operands is described by its first shape.
_OP = re.compile(r"=\s*\(?\s*(\w+)\[([\d,]*)\][^=]*?\s(" + "|".join(KINDS) + r")(?:-start)?\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_ITEMSIZE = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "s8": 1, "u8": 1, "pred": 1}


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    dtype: str
    shape: tuple[int, ...]
    op_name: str  # where it came from (the jitted function's path, or the argument it moves)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE.get(self.dtype, 1)


def collectives(hlo_text: str) -> list[Collective]:
    found = []
    for line in hlo_text.splitlines():
        match = _OP.search(line)
        if match is None:
            continue
        dtype, dims, kind = match.groups()
        name = _OP_NAME.search(line)
        shape = tuple(int(d) for d in dims.split(",") if d)
        found.append(Collective(kind, dtype, shape, name.group(1) if name else ""))
    return found
