"""Failed steps: each suspect of a failed step runs alone until it gets as far as its failed grant
did, so the one sample of a family that fails is found (a sibling succeeding does not clear it),
and a suspect whose pages are pinned by waiting n > 1 children still gets room."""

from __future__ import annotations

from jaxserve.sampling_params import SamplingParams
from tests.engine.mock_model import next_tokens
from tests.engine.test_engine_mock import GREEDY, V, _drive, _no_leaks, engine


def test_the_one_sample_that_fails_late_is_found_and_its_family_failed_the_rest_served():
    # fam#2 fails whenever its grant covers position 12 or later (as a device fault tied to its
    # data would); its siblings succeed alone first, which must not clear the suspicion of it.
    e = engine(budget=16, seqs=4)

    def fail_late_in_fam2(out):
        for rid, start, n in zip(out.request_ids, out.num_computed_tokens, out.num_scheduled_tokens):
            if rid == "fam#2" and start + n > 12:
                raise RuntimeError("injected")

    e.runner.fault_hook = fail_late_in_fam2
    e.add_request("good", [1, 2, 3], SamplingParams(max_tokens=12, **GREEDY))
    e.add_request("fam", list(range(1, 10)), SamplingParams(n=3, max_tokens=8, **GREEDY))
    final, failures = _drive(e, max_steps=300)
    assert failures == ["fam"] and "fam" not in final
    assert final["good"].outputs[0].token_ids == next_tokens([1, 2, 3], 12, V)
    _no_leaks(e)


def test_a_quarantined_request_finds_room_when_waiting_children_pin_the_pages():
    e = engine(num_pages=5, page_size=4, budget=16, seqs=1, max_len=20)
    fired = []

    def fail_once_late(out):
        for rid, start in zip(out.request_ids, out.num_computed_tokens):
            if rid == "fam#0" and start >= 12 and not fired:
                fired.append(1)
                raise RuntimeError("injected")

    e.runner.fault_hook = fail_once_late
    prompt = list(range(1, 10))
    e.add_request("fam", prompt, SamplingParams(n=2, max_tokens=8, **GREEDY))
    final, failures = _drive(e, max_steps=300)
    assert fired and not failures
    assert [c.token_ids for c in final["fam"].outputs] == [next_tokens(prompt, 8, V)] * 2
    _no_leaks(e)
