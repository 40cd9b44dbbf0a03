"""Prefix caching through the whole engine on the mock model (next token = sum of the sequence
mod V, read back from the real paged KV cache): the same tokens with caching on and off over
shared prefixes, divergent suffixes, aborts, preemption and n > 1; exact cached-token counts;
freed pages poisoned before reuse never show; cache_salt; reset."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import EngineConfig
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.sampling_params import SamplingParams
from tests.engine.mock_model import SumModel, next_tokens

V = 101
GREEDY = dict(temperature=0, ignore_eos=True)
POISON = 12345.0


def engine(caching=True, num_pages=64, budget=16, seqs=4, max_len=128, async_scheduling=True):
    config = EngineConfig(
        max_num_seqs=seqs,
        max_num_batched_tokens=budget,
        page_size=4,
        num_kv_pages=num_pages,
        max_model_len=max_len,
        min_token_bucket=8,
        enable_prefix_caching=caching,
        async_scheduling=async_scheduling,
    )
    return LLMEngine(config, model=SumModel(V), progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def cached():
    return engine()


def poison_freed_pages(e, also_cached: bool = False):
    """Before each step: fills with garbage every page that holds nothing (free), and each page
    handed out afresh this step (a cached page evicted for new data included). A correct engine
    reads only KV it wrote, or cached pages; also_cached poisons those too (the test's own check)."""
    kv, page_size = e.scheduler.kv, e.scheduler.kv.page_size

    def hook(sched):
        pages = set(kv._free)
        if also_cached:
            pages |= set(kv._evictable) | set(kv._cached.values())
        for new in sched.new_requests:
            start = sched.num_computed_tokens[sched.request_ids.index(new.request_id)]
            pages |= set(new.page_ids[start // page_size :])  # what it did not find cached
        for added in sched.new_page_ids:
            pages |= set(added)
        if pages:
            index = jnp.asarray(sorted(pages))
            # the pages (the per-layer K/V scales are scalars: left alone)
            e.runner.kv_cache = jax.tree.map(lambda a: a.at[index].set(POISON) if a.ndim else a, e.runner.kv_cache)

    e.runner.fault_hook = hook


def run(e, arrivals, aborts=None, max_steps=3000):
    """arrivals: step -> [(id, prompt, params)]; aborts: step -> [id]. Final outputs by id."""
    final, step, aborts = {}, 0, aborts or {}
    while step < max_steps and (e.has_unfinished_requests() or any(s >= step for s in arrivals)):
        for rid, prompt, params in arrivals.get(step, []):
            e.add_request(rid, prompt, params)
        for rid in aborts.get(step, []):
            e.abort_request(rid)
        for out in e.step():
            if out.finished:
                final[out.request_id] = out
        step += 1
    return final


def assert_no_leaks(e):
    assert not e.has_unfinished_requests()
    e.block_until_idle()
    assert e.scheduler.kv.num_free_pages == e.scheduler.kv.num_pages, "pages leaked"
    assert e.runner.input_batch.num_free == e.runner.num_rows


def workload(seed: int):
    """Shared system prompts, divergent suffixes, multi-turn continuations, n > 1, penalties,
    seeded sampling, over 30 steps; and which requests are aborted when."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(0, V, int(n)).tolist() for n in (13, 26, 40)]
    arrivals, aborts, greedy = {}, {}, {}
    for i in range(24):
        system = systems[i % 3]
        prompt = system + rng.integers(0, V, int(rng.integers(1, 9))).tolist()
        if i % 5 == 4:
            prompt = system[: int(rng.integers(1, len(system)))]  # a prefix of a system prompt
        kind = i % 6
        params = {
            0: dict(max_tokens=12, **GREEDY),
            1: dict(max_tokens=10, temperature=1.0, seed=i, ignore_eos=True),
            2: dict(max_tokens=8, n=3, **GREEDY),
            3: dict(max_tokens=9, temperature=0.7, seed=i, presence_penalty=0.5, ignore_eos=True),
            4: dict(max_tokens=12, **GREEDY),
            5: dict(max_tokens=6, n=2, temperature=1.0, seed=i, ignore_eos=True),
        }[kind]
        rid = f"w{i}"
        arrivals.setdefault(int(rng.integers(0, 30)), []).append((rid, prompt, SamplingParams(**params)))
        if kind in (0, 2, 4):
            greedy[rid] = (prompt, params["max_tokens"])
        if i % 7 == 6:
            aborts.setdefault(int(rng.integers(0, 40)), []).append(rid)
    return arrivals, aborts, greedy


def outcome(final, aborted):
    """Token ids per sample of every request that was not aborted."""
    return {rid: [c.token_ids for c in out.outputs] for rid, out in final.items() if rid not in aborted}


@pytest.mark.parametrize("num_pages", [64, 20])  # 20 pages of 4: preemption and eviction
def test_the_same_tokens_with_and_without_caching(num_pages):
    arrivals, aborts, greedy = workload(num_pages)
    aborted = {rid for ids in aborts.values() for rid in ids}
    results = {}
    for caching in (True, False):
        e = engine(caching=caching, num_pages=num_pages, max_len=64)
        poison_freed_pages(e)
        final = run(e, arrivals, aborts)
        results[caching] = outcome(final, aborted)
        assert sorted(final) == sorted(rid for group in arrivals.values() for rid, _, _ in group)
        for rid, (prompt, max_tokens) in greedy.items():
            if rid not in aborted:
                assert {tuple(t) for t in results[caching][rid]} == {tuple(next_tokens(prompt, max_tokens, V))}, rid
        assert (e.prefix_cache_hits > 0) is caching
        if num_pages == 20:
            assert e.scheduler.num_preemptions > 0 and (not caching or e.scheduler.kv.num_evictions > 0)
        assert_no_leaks(e)
    assert results[True] == results[False]


def test_poisoning_cached_pages_would_show():
    # The poisoning hook has teeth: poisoning the cached pages a later request reads changes its tokens.
    e = engine()
    prompt = list(range(1, 23))
    run(e, {0: [("a", prompt, SamplingParams(max_tokens=3, **GREEDY))]})
    poison_freed_pages(e, also_cached=True)
    out = run(e, {0: [("b", prompt + [5], SamplingParams(max_tokens=3, **GREEDY))]})["b"]
    assert out.num_cached_tokens == 20 and out.outputs[0].token_ids != next_tokens(prompt + [5], 3, V)
    e.runner.fault_hook = None
    assert_no_leaks(e)


def test_cached_tokens_are_counted_exactly(cached):
    e = cached
    e.reset_prefix_cache()
    q0, h0 = e.prefix_cache_queries, e.prefix_cache_hits
    P = [(5 * i + 3) % V for i in range(22)]  # 5 full pages and 2 tokens
    a = run(e, {0: [("a", P, SamplingParams(max_tokens=5, **GREEDY))]})["a"]
    assert a.num_cached_tokens == 0
    b = run(e, {0: [("b", P[:20] + [1, 2, 3], SamplingParams(max_tokens=4, **GREEDY))]})["b"]
    assert b.num_cached_tokens == 20 and b.outputs[0].token_ids == next_tokens(P[:20] + [1, 2, 3], 4, V)
    # The next turn of a's conversation: its prompt, its answer, a new message. a computed 22 + 4
    # tokens (its last output never entered the model): 6 full pages.
    turn = P + a.outputs[0].token_ids + [7, 8]
    c = run(e, {0: [("c", turn, SamplingParams(max_tokens=4, **GREEDY))]})["c"]
    assert c.num_cached_tokens == 24 and c.outputs[0].token_ids == next_tokens(turn, 4, V)
    # n > 1 on a cached prompt: the prefix request forks at once, no prompt page is computed
    tokens = e.stats.tokens
    f = run(e, {0: [("f", P, SamplingParams(n=3, max_tokens=2, **GREEDY))]})["f"]
    assert f.num_cached_tokens == 20 and [o.token_ids for o in f.outputs] == [next_tokens(P, 2, V)] * 3
    assert e.stats.tokens - tokens == 3 * 2 + 3 * 1  # each child's last 2 prompt tokens, then a decode
    # penalties and prompt logprobs need every prompt token computed: no hit, not counted
    g = run(e, {0: [("g", P, SamplingParams(max_tokens=2, presence_penalty=1.0, **GREEDY))]})["g"]
    h = run(e, {0: [("h", P, SamplingParams(max_tokens=2, prompt_logprobs=0, **GREEDY))]})["h"]
    assert g.num_cached_tokens == h.num_cached_tokens == 0 and all(p is not None for p in h.prompt_logprobs[1:])
    assert e.prefix_cache_queries - q0 == 22 + 23 + len(turn) + 22
    assert e.prefix_cache_hits - h0 == 20 + 24 + 20
    assert_no_leaks(e)


def test_cache_salt_separates_identical_prompts(cached):
    e = cached
    P = [(3 * i + 1) % V for i in range(30)]
    outs = {}
    for rid, salt in (("x1", "tenant-x"), ("y1", "tenant-y"), ("n1", None), ("x2", "tenant-x"), ("y2", "tenant-y")):
        params = SamplingParams(max_tokens=3, cache_salt=salt, **GREEDY)
        outs[rid] = run(e, {0: [(rid, P, params)]})[rid]
    assert [outs[r].num_cached_tokens for r in ("x1", "y1", "n1", "x2", "y2")] == [0, 0, 0, 28, 28]
    assert all(o.outputs[0].token_ids == next_tokens(P, 3, V) for o in outs.values())
    assert_no_leaks(e)


def test_reset_forgets_what_no_request_holds(cached):
    e = cached
    P = [(11 * i + 2) % V for i in range(17)]
    run(e, {0: [("a", P, SamplingParams(max_tokens=2, **GREEDY))]})
    assert e.reset_prefix_cache() >= 4 and e.scheduler.kv.num_cached_pages == 0
    b = run(e, {0: [("b", P, SamplingParams(max_tokens=2, **GREEDY))]})["b"]
    assert b.num_cached_tokens == 0
    assert_no_leaks(e)


def test_caching_off_reports_nothing_cached():
    e = engine(caching=False)
    P = list(range(1, 30))
    for rid in ("a", "b"):
        out = run(e, {0: [(rid, P, SamplingParams(max_tokens=2, **GREEDY))]})[rid]
        assert out.num_cached_tokens == 0 and out.outputs[0].token_ids == next_tokens(P, 2, V)
    assert e.prefix_cache_queries == e.prefix_cache_hits == 0 and e.scheduler.kv.num_cached_pages == 0
    assert_no_leaks(e)
