"""The scheduler alone, driven by a hand-computable 'model' (next token = sum of the sequence's
tokens mod 97): grants, chunking, admission order, preemption, n > 1 forks, aborts, page accounting."""

from __future__ import annotations

import pytest

from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import KVPageManager, Request, RequestStatus, Scheduler, SchedulerConfig, SchedulerOutput

V = 97


def make(budget=16, seqs=4, pages=64, page_size=4, max_len=256):
    return Scheduler(SchedulerConfig(seqs, budget, max_len), KVPageManager(pages, page_size))


def req(rid, n_prompt, max_tokens=4, **kw):
    return Request(
        rid,
        list(range(1, n_prompt + 1)),
        SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw),
        max_model_len=256,
    )


def step(s: Scheduler):
    """One step with the 'model' above; returns the grants as (request id, start, q_len) and the output."""
    out = s.schedule()
    grants = list(zip(out.request_ids, out.num_computed_tokens, out.num_scheduled_tokens))
    tokens = [sum(s.requests[rid].token_ids(0, start + n)) % V for rid, start, n in grants]
    s.update(out, tokens)
    return grants, out


def expected_tokens(prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(sum(seq) % V)
    return seq[len(prompt) :]


def test_chunked_prefill_fcfs_and_mixed_steps():
    s = make(budget=16)
    a = req("a", 40)
    s.add_request(a)
    assert step(s)[0] == [("a", 0, 16)]
    s.add_request(req("b", 3))
    assert step(s)[0] == [("a", 16, 16)]  # the running request takes the whole budget first
    assert step(s)[0] == [("a", 32, 8), ("b", 0, 3)]  # a's last chunk samples; b is admitted
    assert step(s)[0] == [("a", 40, 1), ("b", 3, 1)]  # decodes are grants of one
    while s.has_unfinished:
        step(s)
    assert a.output_token_ids == expected_tokens(a.prompt_token_ids, 4)
    assert s.kv.num_free_pages == s.kv.num_pages


def test_max_num_seqs_and_budget_limit_admission():
    s = make(budget=8, seqs=2)
    for i in range(4):
        s.add_request(req(f"r{i}", 2, max_tokens=2))
    assert step(s)[0] == [("r0", 0, 2), ("r1", 0, 2)]
    assert step(s)[0] == [("r0", 2, 1), ("r1", 2, 1)]  # r0, r1 finish (2 tokens each)
    assert step(s)[0] == [("r2", 0, 2), ("r3", 0, 2)]


def test_preemption_by_recompute_when_pages_run_out():
    s = make(budget=32, seqs=4, pages=5, page_size=4)  # 20 token slots
    a, b = req("a", 8, max_tokens=8), req("b", 8, max_tokens=8)
    s.add_request(a)
    s.add_request(b)
    assert step(s)[0] == [("a", 0, 8), ("b", 0, 8)]  # 4 of 5 pages
    assert step(s)[0] == [("a", 8, 1)]  # b needs a 6th page: b, the newest, is preempted
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and s.waiting[0] is b
    assert s.num_preemptions == 1
    while s.has_unfinished:
        step(s)
    assert a.output_token_ids == expected_tokens(a.prompt_token_ids, 8)
    assert b.output_token_ids == expected_tokens(b.prompt_token_ids, 8)  # recompute changes nothing
    assert s.kv.num_free_pages == 5


def test_a_request_larger_than_half_the_pool_never_deadlocks():
    s = make(budget=8, seqs=4, pages=6, page_size=4)
    reqs = [req(f"r{i}", 10, max_tokens=12) for i in range(3)]  # each needs all 6 pages at the end
    for r in reqs:
        s.add_request(r)
    for _ in range(500):
        if not s.has_unfinished:
            break
        step(s)
    assert not s.has_unfinished
    for r in reqs:
        assert r.output_token_ids == expected_tokens(r.prompt_token_ids, 12)
    assert s.kv.num_free_pages == 6


def test_abort_frees_everything_at_any_moment():
    s = make(budget=8)
    s.add_request(req("a", 20))
    s.add_request(req("b", 4))
    step(s)  # a is mid-prefill, b waiting
    s.abort("a")
    s.abort("b")
    assert not s.has_unfinished and not s.waiting and not s.running
    assert s.kv.num_free_pages == s.kv.num_pages


def test_n_children_share_the_prompt_pages():
    s = make(budget=64, page_size=4)
    parent = req("p", 10, max_tokens=3, n=3)
    children = [s.requests[rid] for rid in s.add_request(parent)]
    assert [c.request_id for c in children] == ["p#0", "p#1", "p#2"]
    assert step(s)[0] == [("p#prefix", 0, 8)]  # two full pages, computed once
    assert step(s)[0] == [("p#0", 8, 2), ("p#1", 8, 2), ("p#2", 8, 2)]  # each its own last page
    assert s.kv.table("p#0")[:2] == s.kv.table("p#1")[:2] == s.kv.table("p#2")[:2]
    assert s.kv.num_free_pages == 64 - 2 - 3
    while s.has_unfinished:
        step(s)
    for c in children:
        assert c.output_token_ids == expected_tokens(parent.prompt_token_ids, 3)
    assert s.kv.num_free_pages == 64


def test_abort_of_a_forked_family_mid_prefix():
    s = make(budget=4, page_size=4)
    s.add_request(req("p", 10, n=2))
    step(s)
    aborted = s.abort("p")
    assert sorted(aborted) == ["p#0", "p#1"]
    assert not s.has_unfinished and s.kv.num_free_pages == s.kv.num_pages


def test_stops_on_eos_unless_ignored_and_respects_min_tokens():
    s = make()
    prompt = [5, 5]  # sums: 10, 20, 40, ... mod 97
    r = Request("e", prompt, SamplingParams(max_tokens=10), eos_token_ids=frozenset({20}), max_model_len=256)
    s.add_request(r)
    while s.has_unfinished:
        step(s)
    assert r.output_token_ids == [10, 20] and r.status is RequestStatus.FINISHED_STOPPED
    r2 = Request("f", prompt, SamplingParams(max_tokens=10, stop_token_ids=[40]), max_model_len=256)
    s.add_request(r2)
    while s.has_unfinished:
        step(s)
    assert r2.output_token_ids == [10, 20, 40] and r2.stop_reason == 40


def test_length_limit_from_max_model_len():
    s = make()
    r = Request("m", [1, 2, 3], SamplingParams(max_tokens=None, ignore_eos=True), max_model_len=7)
    s.add_request(r)
    while s.has_unfinished:
        step(s)
    assert len(r.output_token_ids) == 4 and r.status is RequestStatus.FINISHED_LENGTH


@pytest.mark.parametrize("pages,tokens,ok", [(2, 8, True), (2, 9, False)])
def test_page_manager_all_or_nothing(pages, tokens, ok):
    kv = KVPageManager(pages, 4)
    assert (kv.allocate("x", tokens) is not None) is ok
    assert kv.num_free_pages == (0 if ok else 2)


def test_a_quarantined_request_waiting_behind_a_full_batch_stays_within_max_num_seqs():
    s = make(seqs=2)
    for rid in ("a", "b", "c"):
        s.add_request(req(rid, 3, max_tokens=8))
    step(s)  # a and b run, c waits
    s.quarantine(SchedulerOutput([], [], ["c"], [3], [0], [True], [[]], 3))  # as if c's step had failed
    rows, out = step(s)
    assert rows == [("c", 0, 3)] and len(s.running) <= 2 and set(out.removed_ids) & {"a", "b"}


def test_the_handoff_sends_new_requests_in_full_and_running_ones_as_diffs():
    s = make(budget=16, page_size=4)
    s.add_request(req("a", 6, max_tokens=8))
    _, out = step(s)
    (new,) = out.new_requests
    assert new.request_id == "a" and new.token_ids == list(range(1, 7)) and new.num_prompt_tokens == 6
    assert new.page_ids == s.kv.table("a") and len(new.page_ids) == 2  # 6 tokens in pages of 4
    assert not out.new_page_ids[0] and out.samples == [True]
    _, out = step(s)  # position 6: still in page 2
    assert not out.new_requests and out.request_ids == ["a"] and not out.new_page_ids[0]
    _, out = step(s)  # position 7 ... the next decode crosses into a third page
    _, out = step(s)
    assert list(out.new_page_ids[0]) == s.kv.table("a")[2:] and out.num_computed_tokens == [8]
    new.token_ids.append(99)  # a copy: the scheduler's request is untouched
    assert s.requests["a"].prompt_token_ids == list(range(1, 7))


def test_removed_ids_reach_the_next_output_once():
    s = make(budget=16, seqs=4)
    s.add_request(req("a", 3, max_tokens=1))
    s.add_request(req("b", 3, max_tokens=5))
    _, out = step(s)  # a samples its only token and finishes
    assert out.removed_ids == []
    _, out = step(s)
    assert out.removed_ids == ["a"] and out.request_ids == ["b"]
    s.abort("b")
    assert s.has_undelivered_removals
    out = s.schedule()
    assert out.removed_ids == ["b"] and out.num_rows == 0 and not s.has_undelivered_removals


def test_children_of_a_family_get_distinct_seeds_from_the_scheduler():
    s = make(budget=64, page_size=4)
    parent = Request("p", list(range(1, 11)), SamplingParams(n=3, max_tokens=2), seed=7)
    s.add_request(parent)
    seeds = []
    while s.has_unfinished:
        _, out = step(s)
        seeds += [(new.request_id, new.seed) for new in out.new_requests if "#" in new.request_id]
    assert dict(seeds) == {
        "p#prefix": 7,
        "p#0": 7,
        "p#1": (7 + 0x9E3779B9) % 2**32,
        "p#2": (7 + 2 * 0x9E3779B9) % 2**32,
    }


def test_first_admission_is_stamped_once_per_family():
    s = make(budget=32, seqs=4, pages=5, page_size=4)  # a preemption, as in the test above
    a, b = req("a", 8, max_tokens=8), req("b", 8, max_tokens=8)
    s.add_request(a)
    s.add_request(b)
    step(s)
    stamps = s.take_scheduled()
    assert stamps == {"a": a.scheduled_at, "b": b.scheduled_at} and a.scheduled_at <= b.scheduled_at
    first_b = b.scheduled_at
    while s.has_unfinished:
        step(s)
    assert s.num_preemptions >= 1 and b.scheduled_at == first_b  # re-admitted, not re-stamped
    assert s.take_scheduled() == {}

    s = make()
    s.add_request(req("f", 9, max_tokens=2, n=3))  # a prefix request computes 8 shared tokens, then forks
    step(s)
    assert list(s.take_scheduled()) == ["f"]
    while s.has_unfinished:
        step(s)
    assert s.take_scheduled() == {}  # the children carry the family's stamp


@pytest.mark.parametrize("in_flight", [1, 2])
def test_decode_grants_bring_each_page_once_at_its_boundary(in_flight):
    # A decode grant takes a page only when its token starts one (start % page_size == 0); the
    # runner's copy of the table, built from new_requests and new_page_ids, matches the scheduler's.
    s = make(budget=16, page_size=4)
    s.add_request(req("a", 3, max_tokens=14))
    table, issued = [], []
    while s.has_unfinished or issued:
        if s.has_unfinished and len(issued) < in_flight:
            out = s.schedule()
            for new in out.new_requests:
                table += new.page_ids
            for start, n, added in zip(out.num_computed_tokens, out.num_scheduled_tokens, out.new_page_ids):
                boundary = -(-(start + n) // 4) > -(-start // 4)
                assert bool(added) == (boundary and start > 0), (start, n, added)
                table += added
                assert len(table) == -(-(start + n) // 4)  # exactly the pages its tokens need
                assert table == s.kv.table("a")
            if out.num_rows:
                issued.append(out)
                continue
        out = issued.pop(0)
        s.update(out, [7] * out.num_rows)
    assert "a" not in s.requests  # finished and forgotten
    assert s.kv.num_free_pages == s.kv.num_pages
