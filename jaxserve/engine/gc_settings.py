"""Python's garbage collector, set for the step loop: thawed as an engine's start-up begins,
frozen and retuned as it ends (startup.build_engine; and in the API server's process, which
streams every token, as its engine process reports ready: core_client.py).

Two costs it removes (bench_host on the 2-core CPU, 256 decode rows, 2026-12-07):
- A full collection walks everything start-up left alive (JAX, transformers, the model): 223 ms,
  once in 460 steps at 256 rows, a stall every running request waits on. gc.freeze() moves that
  heap out of the collector's reach.
- A youngest-generation collection (~55 us) nearly every step: a step's short-lived containers
  (outputs, their lists) pass Python's default threshold of 700 live allocations before they are
  freed. A streamed token makes ~4 of them (two output objects, two lists), so YOUNG_THRESHOLD
  leaves room for ~5,000 rows (at 256 rows a threshold of 5,000 left 2 collections in 460 steps).

Frozen objects are never collected, so a reference cycle among them that becomes garbage (an
engine dropped by a test) stays until the next engine's start-up thaws the heap and collects it.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000


def thaw() -> None:
    """Makes what an earlier start-up froze collectable again."""
    gc.unfreeze()


def freeze_startup_heap() -> str:
    """Collects, freezes what is left and raises the young generation's threshold (never
    lowers one set higher); returns a line for the start-up log."""
    gc.collect()
    gc.freeze()
    young, *older = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_THRESHOLD), *older)
    return (
        f"garbage collector: {gc.get_freeze_count():,} start-up objects frozen, young-generation threshold "
        f"{gc.get_threshold()[0]:,}"
    )
