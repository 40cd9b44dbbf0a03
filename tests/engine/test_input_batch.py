"""InputBatch.stage's shortcuts for a decode step: the same rows reused while nothing changed
hands, and rebuilt when rows were freed or filled, even for an identical list of request ids."""

from __future__ import annotations

import numpy as np

from jaxserve.engine.input_batch import InputBatch
from jaxserve.engine.packing import Packing
from jaxserve.engine.step import step_input_spec
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler.output import NewRequestData, SchedulerOutput

S = 4  # page size


def new(request_id: str, prompt: list[int], page: int) -> NewRequestData:
    return NewRequestData(request_id, prompt, len(prompt), SamplingParams(temperature=0.0), 0, [page])


def decode(ids: list[str], starts: list[int], removed=(), added=()) -> SchedulerOutput:
    n = len(ids)
    return SchedulerOutput(list(removed), list(added), list(ids), [1] * n, starts, [True] * n, [()] * n, n)


def stage(batch: InputBatch, out: SchedulerOutput):
    batch.apply(out)
    _, x = Packing(step_input_spec(8, 4, 8 // S + 4 + 1, 0)).new()
    staged = batch.stage(out, x)
    return staged, x


def test_a_decode_step_reuses_rows_until_rows_change_hands():
    batch = InputBatch(
        max_rows=4, max_model_len=32, page_size=S, pages_per_seq=8, num_pages=16, vocab_size=11, processor_names=[]
    )
    # a and b take rows 0 and 1 with their last prompt token as the step's input
    first, x = stage(batch, decode(["a", "b"], [2, 1], added=[new("a", [1, 2, 3], 5), new("b", [4, 5], 6)]))
    assert first.rows.tolist() == [0, 1] and x.tokens[:2].tolist() == [3, 5]
    assert x.slot_mapping[:2].tolist() == [5 * S + 2, 6 * S + 1]
    batch.record(first, np.array([7, 8], np.int32))
    again, x = stage(batch, decode(["a", "b"], [3, 2]))
    assert again.rows is first.rows  # nothing changed hands: the same rows
    assert x.tokens[:2].tolist() == [7, 8] and x.positions[:2].tolist() == [3, 2]
    # Both leave and come back, each in the other's row (freed rows are handed out last freed
    # first): the same list of ids, other rows
    batch.record(again, np.array([9, 10], np.int32))
    back = [new("b", [4, 5], 6), new("a", [1, 2, 3], 5)]
    out = SchedulerOutput(["b", "a"], back, ["a", "b"], [3, 2], [0, 0], [True, True], [(), ()], 5)
    moved, x = stage(batch, out)
    assert moved.rows.tolist() == [batch.row_of["a"], batch.row_of["b"]] == [1, 0]
    assert x.tokens[:5].tolist() == [1, 2, 3, 4, 5] and x.table_rows[:2].tolist() == [1, 0]


def test_as_many_tokens_as_sequences_is_not_a_decode_step():
    """q_lens [0, 2] have one token a sequence on average: the tokens are still b's two, at its
    positions (the decode shortcut goes by every q_len being 1, not by the total)."""
    batch = InputBatch(
        max_rows=4, max_model_len=32, page_size=S, pages_per_seq=8, num_pages=16, vocab_size=11, processor_names=[]
    )
    out = SchedulerOutput(
        [], [new("a", [1, 2, 3], 5), new("b", [4, 5], 6)], ["a", "b"], [0, 2], [3, 0], [False, True], [(), ()], 2
    )
    _, x = stage(batch, out)
    assert x.tokens[:2].tolist() == [4, 5]
    assert x.positions[:2].tolist() == [0, 1]
    assert x.slot_mapping[:2].tolist() == [6 * S, 6 * S + 1]
