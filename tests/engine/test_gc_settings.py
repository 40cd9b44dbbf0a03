"""The garbage collector after an engine's start-up: its heap frozen, the young generation's
threshold raised, and an engine dropped in a cycle collected by the next engine's start-up."""

from __future__ import annotations

import gc
import weakref

import pytest

from jaxserve.config import EngineConfig
from jaxserve.engine import gc_settings
from jaxserve.engine.llm_engine import LLMEngine
from tests.engine.mock_model import SumModel

V = 101


@pytest.fixture(autouse=True)
def restore_gc():
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def engine(log=lambda *_: None) -> LLMEngine:
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, page_size=4, num_kv_pages=32, max_model_len=64)
    return LLMEngine(config, model=SumModel(V), progress=False, log=log)


def test_start_up_freezes_its_heap_and_raises_the_young_threshold():
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    lines = []
    engine(log=lines.append)
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (gc_settings.YOUNG_THRESHOLD, 10, 10)
    assert any(line.startswith("garbage collector:") and "frozen" in line for line in lines)


def test_a_higher_threshold_is_kept():
    gc.set_threshold(10 * gc_settings.YOUNG_THRESHOLD, 10, 10)
    engine()
    assert gc.get_threshold()[0] == 10 * gc_settings.YOUNG_THRESHOLD


def test_an_engine_dropped_in_a_cycle_is_collected_by_the_next_start_up():
    first = engine()
    runner = weakref.ref(first.core.runner)
    first.cycle = first  # garbage only the collector can free
    del first
    gc.collect()
    assert runner() is not None  # frozen: out of the collector's reach
    engine()
    assert runner() is None
