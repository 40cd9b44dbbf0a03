"""Data of one request never reaches another: ids that would collide with a request's samples are
refused, and what a step computed for a request that ended does not reach a new request that
reuses its id."""

from __future__ import annotations

import pytest

from jaxserve.sampling_params import SamplingParams
from tests.engine.mock_model import next_tokens
from tests.engine.test_engine_mock import GREEDY, V, _drive, _no_leaks, engine


def test_an_id_naming_another_requests_sample_is_refused():
    e = engine()
    e.add_request("foo", [1, 2, 3], SamplingParams(n=2, max_tokens=3, **GREEDY))
    with pytest.raises(ValueError, match="#"):
        e.add_request("foo#0", [4, 5], SamplingParams(max_tokens=3, **GREEDY))
    final, failures = _drive(e)
    assert not failures and [c.token_ids for c in final["foo"].outputs] == [next_tokens([1, 2, 3], 3, V)] * 2
    _no_leaks(e)


def test_prompt_logprobs_of_an_aborted_request_do_not_reach_a_new_one_with_its_id():
    e = engine(budget=8)
    e.add_request("y", [7, 8], SamplingParams(max_tokens=40, **GREEDY))
    for _ in range(3):
        e.step()
    e.add_request("x", list(range(1, 30)), SamplingParams(max_tokens=2, prompt_logprobs=1, **GREEDY))
    e.step()  # x's first prefill chunk is in flight
    e.abort_request("x")
    e.abort_request("y")
    e.add_request("x", [3, 4, 5], SamplingParams(max_tokens=2, prompt_logprobs=1, **GREEDY))
    final, failures = _drive(e)
    assert not failures
    out = final["x"]
    assert out.outputs[0].token_ids == next_tokens([3, 4, 5], 2, V)
    assert len(out.prompt_logprobs) == 3 and out.prompt_logprobs[0] is None
    _no_leaks(e)


def test_a_requests_logit_bias_and_min_tokens_stay_with_it_when_its_row_is_reused():
    """The device keeps each row's logit bias and banned ids; a later request in the same row
    samples with its own (or none)."""
    e = engine(seqs=1)  # one row: every request takes row 0 in turn
    prompt = [5, 6, 7]
    forced = (next_tokens(prompt, 1, V)[0] + 3) % V
    e.add_request("biased", prompt, SamplingParams(max_tokens=3, logit_bias={forced: 100.0}, **GREEDY))
    e.add_request("plain", prompt, SamplingParams(max_tokens=3, **GREEDY))
    stop = next_tokens(prompt, 1, V)[0]  # what "plain" would say first: a stop id, banned for 2 tokens
    e.add_request("late", prompt, SamplingParams(max_tokens=4, stop_token_ids=[stop], min_tokens=2, temperature=0))
    e.add_request("plain2", prompt, SamplingParams(max_tokens=3, **GREEDY))
    final, failures = _drive(e)
    assert not failures
    assert final["biased"].outputs[0].token_ids == [forced] * 3
    assert final["plain"].outputs[0].token_ids == final["plain2"].outputs[0].token_ids == next_tokens(prompt, 3, V)
    late = final["late"].outputs[0].token_ids
    assert late[0] != stop and len(late) >= 2
    _no_leaks(e)
