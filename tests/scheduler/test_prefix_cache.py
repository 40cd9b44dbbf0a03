"""Prefix caching in the scheduler and the page manager, without a device: which pages a request
finds, when pages become findable, eviction order, reference counts, salts, what is counted."""

from __future__ import annotations

import pytest

from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import KVPageManager, Request, Scheduler, SchedulerConfig
from tests.scheduler.test_scheduler import expected_tokens, step

S = 4  # page size


def make(budget=64, seqs=4, pages=64, caching=True):
    return Scheduler(SchedulerConfig(seqs, budget, 256), KVPageManager(pages, S, enable_caching=caching))


def req(rid, prompt, max_tokens=3, **kw):
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw), max_model_len=256)


def finish(s):
    while s.has_unfinished:
        step(s)


def admitted_at(s, rid) -> int:
    """Steps s until rid is scheduled; returns where its first grant starts."""
    for _ in range(100):
        grants, _ = step(s)
        for r, start, _ in grants:
            if r == rid:
                return start
    raise AssertionError(f"{rid} never ran")


PROMPT = list(range(10, 32))  # 22 tokens: 5 full pages and 2 tokens


# -- the page manager -------------------------------------------------------------------------
def test_lookup_finds_the_longest_chain_of_exact_pages():
    kv = KVPageManager(16, S)
    kv.allocate("a", 12)
    kv.cache_pages("a", entries := [], list(range(12)), None)
    assert len(entries) == 3 and kv.num_cached_pages == 3
    pages, found = kv.lookup(list(range(12)), 3)
    assert pages == kv.table("a") and found == entries
    assert kv.lookup([0, 1, 2, 3, 4, 5, 6, 99, 8, 9, 10, 11], 3)[0] == kv.table("a")[:1]  # page 1 differs
    assert kv.lookup([9, 1, 2, 3, 4, 5, 6, 7], 2)[0] == []  # page 0 differs: nothing after it counts
    assert kv.lookup(list(range(12)), 2)[0] == kv.table("a")[:2]  # never past the pages asked for
    assert kv.lookup(list(range(12)), 3, salt="tenant")[0] == []


def test_freed_cached_pages_are_evicted_last_pages_first_and_only_when_nothing_is_free():
    kv = KVPageManager(6, S)
    kv.allocate("a", 12)
    a = list(kv.table("a"))
    kv.cache_pages("a", [], list(range(12)), None)
    kv.free("a")
    assert kv.num_free_pages == 6 and kv.num_cached_pages == 3
    kv.allocate("b", 12)  # the 3 pages never used: the cache keeps all of a's
    assert not set(kv.table("b")) & set(a) and kv.num_cached_pages == 3
    kv.allocate("c", 4)  # one more: evicts a's last page
    assert kv.table("c") == [a[2]] and kv.num_cached_pages == 2 and kv.num_evictions == 1
    assert kv.lookup(list(range(12)), 3)[0] == a[:2]


def test_a_hit_takes_pages_back_from_the_eviction_order_and_counts_them():
    kv = KVPageManager(4, S)
    kv.allocate("a", 8)
    a = list(kv.table("a"))
    kv.cache_pages("a", [], list(range(8)), None)
    kv.free("a")
    cached, _ = kv.lookup(list(range(8)), 2)
    assert kv.allocate("b", 20, cached) is None and kv.table("b") == []  # 2 cached + 3 new > 4
    assert kv.allocate("b", 16, cached) is not None  # 2 cached + 2 free
    assert kv.table("b")[:2] == a and kv.num_free_pages == 0
    kv.share("c", "b", 2)  # held twice now
    kv.free("b")
    assert kv.num_free_pages == 2 and kv.num_cached_pages == 2  # b's new pages were never cached
    kv.free("c")
    assert kv.num_free_pages == 4


def test_a_page_computed_twice_is_cached_once_and_the_chain_goes_on():
    kv = KVPageManager(16, S)
    kv.allocate("a", 8)
    kv.allocate("b", 12)
    kv.cache_pages("a", ea := [], list(range(8)), None)
    kv.cache_pages("b", eb := [], list(range(12)), None)  # its first two pages are a's keys
    assert eb[:2] == ea and kv.num_cached_pages == 3
    assert kv.lookup(list(range(12)), 3)[0] == kv.table("a") + kv.table("b")[2:]


def test_reset_forgets_unreferenced_pages_or_all():
    kv = KVPageManager(8, S)
    for rid in ("a", "b"):
        kv.allocate(rid, 8)
        kv.cache_pages(rid, [], [ord(rid)] * 8, None)
    kv.free("a")
    assert kv.reset_cache() == 2 and kv.num_cached_pages == 2  # b's stay
    assert kv.lookup([ord("a")] * 8, 2)[0] == [] and len(kv.lookup([ord("b")] * 8, 2)[0]) == 2
    assert kv.reset_cache(referenced_too=True) == 2 and kv.num_cached_pages == 0
    kv.free("b")
    assert kv.num_free_pages == 8 and not kv._evictable


def test_caching_off_finds_nothing():
    kv = KVPageManager(8, S, enable_caching=False)
    kv.allocate("a", 8)
    assert kv.lookup(list(range(8)), 2) == ([], [])


# -- the scheduler ----------------------------------------------------------------------------
def test_a_second_request_starts_past_the_cached_pages_and_computes_the_last_token():
    s = make()
    a = req("a", PROMPT)
    s.add_request(a)
    finish(s)
    b = req("b", PROMPT[:20] + [1, 2, 3])
    s.add_request(b)
    assert admitted_at(s, "b") == 20
    finish(s)
    assert b.output_token_ids == expected_tokens(b.prompt_token_ids, 3) and b.num_cached_tokens == 20
    c = req("c", PROMPT[:20])  # all of it cached: the last page is computed again, to sample
    s.add_request(c)
    assert admitted_at(s, "c") == 16
    finish(s)
    assert c.num_cached_tokens == 16 and c.output_token_ids == expected_tokens(c.prompt_token_ids, 3)
    assert s.prefix_cache.queries == 22 + 23 + 20 and s.prefix_cache.hits == 20 + 16
    assert s.take_num_cached_tokens() == {"a": 0, "b": 20, "c": 16}
    assert s.take_num_cached_tokens() == {}
    assert s.kv.num_free_pages == s.kv.num_pages


def test_pages_computed_in_a_step_are_not_found_in_the_same_step():
    s = make()
    s.add_request(req("a", PROMPT))
    s.add_request(req("b", PROMPT))
    grants, _ = step(s)
    assert grants == [("a", 0, 22), ("b", 0, 22)]  # b would otherwise read pages a writes now
    s.add_request(req("c", PROMPT))
    grants, _ = step(s)
    assert ("c", 20, 2) in grants  # the next step finds them
    finish(s)


def test_the_pages_of_a_decoding_request_are_cached_as_its_tokens_become_known():
    s = make()
    a = req("a", list(range(1, 7)), max_tokens=8)  # 6 prompt tokens, then 8 outputs
    s.add_request(a)
    finish(s)  # computed: 6 + 7 tokens (the last output is never fed back): 3 full pages
    b = req("b", a.prompt_token_ids + a.output_token_ids + [5])
    s.add_request(b)
    assert admitted_at(s, "b") == 12
    finish(s)
    assert b.output_token_ids == expected_tokens(b.prompt_token_ids, 3)


def test_penalties_and_prompt_logprobs_take_no_hit_but_feed_the_cache():
    s = make()
    s.add_request(req("a", PROMPT, presence_penalty=0.5))
    finish(s)
    s.add_request(req("b", PROMPT, prompt_logprobs=1))
    assert admitted_at(s, "b") == 0
    finish(s)
    s.add_request(req("c", PROMPT))
    assert admitted_at(s, "c") == 20  # a's (or b's) pages
    finish(s)
    assert s.prefix_cache.queries == 22 and s.prefix_cache.hits == 20  # only c looked up


def test_cache_salt_separates_otherwise_identical_prompts():
    s = make()
    s.add_request(req("a", PROMPT, cache_salt="tenant-1"))
    finish(s)
    for rid, salt, start in (("b", "tenant-2", 0), ("c", None, 0), ("d", "tenant-1", 20), ("e", "tenant-2", 20)):
        s.add_request(req(rid, PROMPT, cache_salt=salt))
        assert admitted_at(s, rid) == start, rid
        finish(s)


def test_a_preempted_request_finds_its_own_pages_again():
    s = make(budget=32, pages=5)  # 20 token slots
    a, b = req("a", list(range(1, 9)), max_tokens=5), req("b", list(range(50, 58)), max_tokens=10)
    s.add_request(a)
    s.add_request(b)
    step(s)  # both prefill 8 tokens: 4 of 5 pages
    assert step(s)[0] == [("a", 8, 1)]  # b needs a 6th page: preempted, its 2 full pages cached
    assert b.num_preemptions == 1 and s.kv.num_cached_pages == 4
    assert admitted_at(s, "b") == 8  # once a is done: b's prompt pages are found again
    finish(s)
    assert a.output_token_ids == expected_tokens(a.prompt_token_ids, 5)
    assert b.output_token_ids == expected_tokens(b.prompt_token_ids, 10)
    assert s.prefix_cache.hits == 8 and b.num_cached_tokens == 0  # the user is told the first admission's
    assert s.kv.num_free_pages == 5


def test_n_samples_fork_at_once_when_the_prefix_is_cached():
    s = make()
    s.add_request(req("a", PROMPT))
    finish(s)
    fam = req("f", PROMPT, n=3)
    children = [s.requests[rid] for rid in s.add_request(fam)]
    grants, _ = step(s)
    assert grants == [("f#0", 20, 2), ("f#1", 20, 2), ("f#2", 20, 2)]  # no prefix request ran
    finish(s)
    assert [c.output_token_ids for c in children] == [expected_tokens(PROMPT, 3)] * 3
    assert s.take_num_cached_tokens()["f"] == 20
    assert s.kv.num_free_pages == s.kv.num_pages


def test_n_samples_with_a_partly_cached_prefix():
    s = make(budget=8)
    s.add_request(req("a", PROMPT[:10]))
    finish(s)
    s.add_request(req("f", PROMPT, n=2))
    grants, _ = step(s)
    assert grants == [("f#prefix", 8, 8)]  # 2 pages cached, 2 computed, then the fork
    finish(s)
    assert s.kv.num_free_pages == s.kv.num_pages


def test_a_failed_step_forgets_the_cache():
    s = make()
    s.add_request(req("a", PROMPT))
    finish(s)
    assert s.kv.num_cached_pages == 6  # 22 prompt tokens and 2 of the 3 outputs were computed
    s.add_request(req("b", PROMPT))
    s.schedule()  # launched; then the engine reports a failure
    s.retry(["b"])
    assert s.kv.num_cached_pages == 0
    assert admitted_at(s, "b") == 0
    finish(s)


@pytest.mark.parametrize("caching", [True, False])
def test_the_same_tokens_with_and_without_caching(caching):
    s = make(budget=16, pages=24, caching=caching)
    prompts = {f"r{i}": PROMPT[: 8 + 3 * i] + [i] * (i % 3) for i in range(8)}
    reqs = {rid: req(rid, p, max_tokens=6) for rid, p in prompts.items()}
    for r in reqs.values():
        s.add_request(r)
        step(s)
    finish(s)
    for rid, r in reqs.items():
        assert r.output_token_ids == expected_tokens(prompts[rid], 6), rid
    assert (s.prefix_cache.hits > 0) is caching
    assert s.kv.num_free_pages == s.kv.num_pages
