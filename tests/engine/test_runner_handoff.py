"""The model runner driven by hand-built SchedulerOutputs: the handoff contract alone, no scheduler.

The mock model's next token is the sum of the sequence's tokens mod V, through the real paged
cache, so every token below is computable by hand; a wrong page, row or pending token shows.
"""

from __future__ import annotations

import pytest

from jaxserve.engine.buckets import BucketPlan
from jaxserve.engine.runner import ModelRunner
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import NewRequestData, SchedulerOutput
from tests.engine.mock_model import SumModel, next_tokens

V = 101
GREEDY = SamplingParams(temperature=0, ignore_eos=True, max_tokens=16)


@pytest.fixture(scope="module")
def runner():
    r = ModelRunner(
        SumModel(V), num_pages=16, page_size=4, max_model_len=32, plan=BucketPlan.make(16, 4, 8), max_num_seqs=4
    )
    r.warm_up(progress=False)
    return r


def grants(removed=(), new=(), rows=()):
    """rows: (request id, start, q_len, samples, new pages)."""
    return SchedulerOutput(
        removed_ids=list(removed),
        new_requests=list(new),
        request_ids=[r[0] for r in rows],
        num_scheduled_tokens=[r[2] for r in rows],
        num_computed_tokens=[r[1] for r in rows],
        samples=[r[3] for r in rows],
        new_page_ids=[list(r[4]) for r in rows],
        num_tokens=sum(r[2] for r in rows),
    )


def test_new_requests_decodes_on_pending_tokens_page_deltas_and_removal(runner):
    a, b = [1, 2, 3], [7, 8, 9, 10, 11, 12]
    want_a, want_b = next_tokens(a, 4, V), next_tokens(b, 3, V)
    new = [NewRequestData("a", a, 3, GREEDY, 0, [5]), NewRequestData("b", b, 6, GREEDY, 0, [2, 9])]
    # Step 1: both prompts. Step 2 is launched before step 1 is read back: its input tokens are
    # on the device only (the runner must point at them, not at stale host values).
    s1 = runner.execute(grants(new=new, rows=[("a", 0, 3, True, []), ("b", 0, 6, True, [])]))
    s2 = runner.execute(grants(rows=[("a", 3, 1, True, []), ("b", 6, 1, True, [])]))
    assert runner.read_back(s1).tokens == [want_a[0], want_b[0]]
    assert runner.read_back(s2).tokens == [want_a[1], want_b[1]]
    # Step 3: a crosses into a second page, given as a delta; b is not granted this step.
    s3 = runner.execute(grants(rows=[("a", 4, 1, True, [11])]))
    assert runner.read_back(s3).tokens == [want_a[2]]
    # Step 4: a's row is freed; c takes a row and b decodes from a token read back two steps ago.
    c = [4, 4]
    s4 = runner.execute(
        grants(
            removed=["a"],
            new=[NewRequestData("c", c, 2, GREEDY, 0, [3])],
            rows=[("b", 7, 1, True, []), ("c", 0, 2, True, [])],
        )
    )
    assert runner.read_back(s4).tokens == [want_b[2], next_tokens(c, 1, V)[0]]
    assert runner.input_batch.num_free == runner.num_rows - 2
    runner.execute(grants(removed=["b", "c"]))  # launches nothing
    assert runner.input_batch.num_free == runner.num_rows


def test_a_resumed_request_brings_its_outputs_and_a_chunked_prompt_samples_once(runner):
    prompt = list(range(1, 10))
    first = next_tokens(prompt, 2, V)
    # Resumed after a preemption: prompt and two outputs, recomputed in two chunks.
    tokens = prompt + first
    s1 = runner.execute(
        grants(new=[NewRequestData("r", tokens, 9, GREEDY, 0, [0, 1, 4])], rows=[("r", 0, 8, False, [])])
    )
    s2 = runner.execute(grants(rows=[("r", 8, 3, True, [])]))
    runner.read_back(s1)
    assert runner.read_back(s2).tokens == [next_tokens(prompt, 3, V)[2]]
    runner.execute(grants(removed=["r"]))


def test_a_grant_without_a_page_is_refused(runner):
    with pytest.raises(ValueError, match="no page"):
        runner.execute(grants(new=[NewRequestData("x", [1] * 5, 5, GREEDY, 0, [0])], rows=[("x", 0, 5, True, [])]))
    runner.execute(grants(removed=["x"]))
    assert runner.input_batch.num_free == runner.num_rows
