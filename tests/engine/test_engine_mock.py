"""The whole engine (scheduler, staging, compiled step, sampling, detokenizer) on the mock model:
exact tokens under staggered arrivals, chunked prefill, preemption, aborts, n > 1, stop strings,
bad input, and no page left allocated after any test."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxserve.config import EngineConfig
from jaxserve.engine.llm_engine import LLMEngine, StepFailed
from jaxserve.sampling_params import SamplingParams
from tests.engine.mock_model import SumModel, next_tokens

V = 101


def engine(num_pages=64, page_size=4, budget=16, seqs=4, tokenizer=None, model=None, max_len=256):
    config = EngineConfig(
        max_num_seqs=seqs,
        max_num_batched_tokens=budget,
        page_size=page_size,
        num_kv_pages=num_pages,
        max_model_len=max_len,
        min_token_bucket=8,
    )
    return LLMEngine(config, model=model or SumModel(V), tokenizer=tokenizer, progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def small():
    return engine()


@pytest.fixture(autouse=True)
def no_leaks(request):
    yield
    for name in ("small", "tiny_pool"):
        if name in request.fixturenames:
            e = request.getfixturevalue(name)
            assert not e.has_unfinished_requests()
            e.block_until_idle()
            assert e.scheduler.kv.num_free_pages == e.scheduler.kv.num_pages, "pages leaked"
            assert e.runner.input_batch.num_free == e.runner.num_rows, "input batch rows leaked"


def run(e, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]], max_steps=1000):
    """arrivals: step number -> requests added before that step. Returns final outputs by id."""
    final, step = {}, 0
    while step < max_steps and (e.has_unfinished_requests() or any(s >= step for s in arrivals)):
        for rid, prompt, params in arrivals.get(step, []):
            e.add_request(rid, prompt, params)
        for out in e.step():
            if out.finished:
                final[out.request_id] = out
        step += 1
    return final


def _drive(e, max_steps=500):
    """Steps until done, collecting final outputs and the requests StepFailed gave up on."""
    final, failures = {}, []
    for _ in range(max_steps):
        if not e.has_unfinished_requests():
            break
        try:
            for out in e.step():
                if out.finished:
                    final[out.request_id] = out
        except StepFailed as err:
            failures += err.failed
    return final, failures


def _no_leaks(e):
    assert not e.has_unfinished_requests()
    e.block_until_idle()
    assert e.scheduler.kv.num_free_pages == e.scheduler.kv.num_pages
    assert e.runner.input_batch.num_free == e.runner.num_rows


GREEDY = dict(temperature=0, ignore_eos=True)


def test_staggered_arrivals_and_chunked_prefill_give_exact_tokens(small):
    rng = np.random.default_rng(0)
    prompts = {f"r{i}": rng.integers(0, V, n).tolist() for i, n in enumerate([3, 40, 1, 17, 9, 64, 2, 30])}
    arrivals = {0: [], 1: [], 3: [], 7: []}
    for i, (rid, p) in enumerate(prompts.items()):
        arrivals[[0, 1, 3, 7][i % 4]].append((rid, p, SamplingParams(max_tokens=5 + i, **GREEDY)))
    final = run(small, arrivals)
    for i, (rid, p) in enumerate(prompts.items()):
        out = final[rid].outputs[0]
        assert out.token_ids == next_tokens(p, 5 + i, V), rid
        assert out.finish_reason == "length"
    assert small.num_compilations_since_warmup == 0


@pytest.fixture(scope="module")
def tiny_pool():
    return engine(num_pages=12, page_size=4, budget=32, seqs=4, max_len=48)  # 48 token slots


def test_preemption_with_a_tiny_page_pool(tiny_pool):
    rng = np.random.default_rng(1)
    prompts = {f"p{i}": rng.integers(0, V, 10).tolist() for i in range(4)}
    before = tiny_pool.scheduler.num_preemptions
    final = run(tiny_pool, {0: [(rid, p, SamplingParams(max_tokens=20, **GREEDY)) for rid, p in prompts.items()]})
    assert tiny_pool.scheduler.num_preemptions > before
    for rid, p in prompts.items():
        assert final[rid].outputs[0].token_ids == next_tokens(p, 20, V)


def test_abort_mid_stream_frees_pages(small):
    small.add_request("long", list(range(1, 30)), SamplingParams(max_tokens=50, **GREEDY))
    small.add_request("other", [4, 5], SamplingParams(max_tokens=6, **GREEDY))
    for _ in range(4):
        small.step()
    assert small.scheduler.kv.num_free_pages < small.scheduler.kv.num_pages
    small.abort_request("long")
    final = run(small, {})
    assert final["long"].outputs[0].finish_reason == "abort"
    assert final["other"].outputs[0].token_ids == next_tokens([4, 5], 6, V)


def test_n_samples_share_the_prompt(small):
    prompt = list(range(1, 23))  # 22 tokens: 5 full pages shared, each child computes the last 2
    small.reset_prefix_cache()  # earlier tests' prompts (1, 2, 3, ...) would be found cached
    tokens_before = small.stats.tokens
    small.add_request("fam", prompt, SamplingParams(n=3, max_tokens=4, **GREEDY))
    final = {}
    while small.has_unfinished_requests():
        for out in small.step():
            final[out.request_id] = out
    out = final["fam"]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:
        assert c.token_ids == next_tokens(prompt, 4, V)
    assert small.stats.tokens - tokens_before == 20 + 3 * 2 + 3 * 3  # prefix once, tails, then decodes


def test_n_samples_sharing_more_pages_than_a_step_sends():
    # 14 shared pages: more than a (16-token, 4-row) step's 9 page updates, so each child's page
    # table row is written whole before its first step.
    e = engine(num_pages=128, budget=16, seqs=4)
    prompt = [(7 * i) % V for i in range(60)]
    e.add_request("fam", prompt, SamplingParams(n=2, max_tokens=6, **GREEDY))
    out = run(e, {})["fam"]
    assert [c.token_ids for c in out.outputs] == [next_tokens(prompt, 6, V)] * 2
    e.block_until_idle()
    assert e.runner.input_batch.num_free == e.runner.num_rows


def test_async_scheduling_matches_one_step_at_a_time():
    # Page pressure (preemption), chunked prefill, stop tokens, sampling with seeds and penalties:
    # the same tokens whether step n+1 is scheduled before step n's tokens are read or after.
    rng = np.random.default_rng(3)
    arrivals = {}
    for i in range(10):
        params = (
            SamplingParams(max_tokens=12, **GREEDY)
            if i % 3 == 0
            else SamplingParams(max_tokens=10, temperature=0.8, seed=i, presence_penalty=0.5)
            if i % 3 == 1
            else SamplingParams(max_tokens=15, temperature=0, stop_token_ids=[int(rng.integers(V))])
        )
        arrivals.setdefault(i // 3, []).append((f"r{i}", rng.integers(0, V, int(rng.integers(1, 30))).tolist(), params))
    results = []
    for async_scheduling in (True, False):
        config = EngineConfig(
            max_num_seqs=4,
            max_num_batched_tokens=16,
            page_size=4,
            num_kv_pages=24,
            max_model_len=96,
            min_token_bucket=8,
            async_scheduling=async_scheduling,
        )
        e = LLMEngine(config, model=SumModel(V), progress=False, log=lambda *_: None)
        final = run(e, arrivals)
        results.append({rid: (out.outputs[0].token_ids, out.outputs[0].finish_reason) for rid, out in final.items()})
        assert e.scheduler.num_preemptions > 0
        assert e.scheduler.kv.num_free_pages == e.scheduler.kv.num_pages
        e.block_until_idle()
        assert e.runner.input_batch.num_free == e.runner.num_rows
    for rid, prompt, params in (a for group in arrivals.values() for a in group):
        if params.temperature == 0 and params.ignore_eos:
            assert results[0][rid][0] == next_tokens(prompt, 12, V)
    assert results[0] == results[1]


def test_seeded_sampling_is_reproducible(small):
    params = SamplingParams(temperature=50.0, seed=7, max_tokens=8, ignore_eos=True)  # hot: really random
    alone = run(small, {0: [("s", [1, 2, 3], params)]})["s"].outputs[0].token_ids
    crowd = (
        run(
            small,
            {
                0: [(f"x{i}", [i + 1] * (i + 2), SamplingParams(temperature=1.0, max_tokens=9)) for i in range(3)]
                + [("s", [1, 2, 3], params)]
            },
        )["s"]
        .outputs[0]
        .token_ids
    )
    assert alone == crowd and alone != next_tokens([1, 2, 3], 8, V)


def test_bad_input_raises_before_queueing(small):
    with pytest.raises(ValueError, match="empty"):
        small.add_request("e", [], SamplingParams())
    with pytest.raises(ValueError, match="maximum context length is 256 tokens. However, you requested 300 tokens"):
        small.add_request("e", [1] * 200, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match=r"out of the vocabulary \[0, 101\)"):
        small.add_request("e", [1, 500], SamplingParams())
    with pytest.raises(ValueError, match="logit_bias token ids out of the vocabulary"):
        small.add_request("e", [1], SamplingParams(logit_bias={1000: 1.0}))
    with pytest.raises(ValueError, match="unknown logits processors"):
        small.add_request("e", [1], SamplingParams(logits_processors=["nope"]))
    assert not small.has_unfinished_requests()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=-2), "top_k"),
        (dict(n=0), "n must"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(logprobs=21), "logprobs"),
        (dict(min_p=2), "min_p"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_a_tiny_temperature_samples_greedily(small):
    """Below 1e-5 the temperature is greedy, as in vLLM (logits / 1e-40 overflow to NaN)."""
    assert SamplingParams(temperature=1e-40).temperature == 0 == SamplingParams(temperature=5e-6).temperature
    assert SamplingParams(temperature=1e-5).temperature == 1e-5
    prompt = [1, 2, 3]
    out = run(small, {0: [("t", prompt, SamplingParams(temperature=1e-40, max_tokens=6, ignore_eos=True))]})
    assert out["t"].outputs[0].token_ids == next_tokens(prompt, 6, V)


def test_a_failing_request_fails_alone_and_the_rest_is_served():
    e = engine(num_pages=64, page_size=4, budget=32, seqs=4)

    def fail_on_77(sched):  # as a device error would, for any step starting a prompt with token 77
        if any(77 in new.token_ids for new in sched.new_requests):
            raise RuntimeError("injected")

    e.runner.fault_hook = fail_on_77
    good = [[1, 2, 3], [5] * 9]
    for i, p in enumerate(good):
        e.add_request(f"good{i}", p, SamplingParams(max_tokens=8, **GREEDY))
    e.add_request("bad", [4, 77, 4], SamplingParams(max_tokens=8, **GREEDY))
    final, failures = _drive(e)
    assert failures == ["bad"] and "bad" not in final
    for i, p in enumerate(good):
        assert final[f"good{i}"].outputs[0].token_ids == next_tokens(p, 8, V)
    assert e.scheduler.kv.num_free_pages == e.scheduler.kv.num_pages and not e.scheduler.has_quarantine


def _family_gets_exact_tokens(e, n: int, max_tokens: int) -> None:
    """An n-sample greedy family on a 22-token prompt (shared pages) ends exactly, failing nothing."""
    prompt = list(range(1, 23))
    e.add_request("fam", prompt, SamplingParams(n=n, max_tokens=max_tokens, **GREEDY))
    final, failures = _drive(e)
    assert not failures
    assert [c.token_ids for c in final["fam"].outputs] == [next_tokens(prompt, max_tokens, V)] * n
    _no_leaks(e)


def test_a_prefix_forks_only_after_its_last_chunk_ran():
    # With async scheduling the prefix's computed count reaches the prompt's shared length when
    # its last chunk is scheduled; if that step then fails, the children must not fork yet.
    e = engine(budget=8)
    fired = []

    def failing(sched):  # the prefix's last grant: 22 - 1 tokens rounded down to pages of 4
        last = [
            i
            for i, r in enumerate(sched.request_ids)
            if r == "fam#prefix" and sched.num_computed_tokens[i] + sched.num_scheduled_tokens[i] == 20
        ]
        if last and not fired:
            fired.append(1)
            raise RuntimeError("injected")

    e.runner.fault_hook = failing
    _family_gets_exact_tokens(e, n=2, max_tokens=4)
    assert fired


def test_a_device_failure_after_launch_recomputes_every_live_request():
    # The step runs (consuming the donated cache), then fails: forked children still waiting on
    # shared pages must start over too.
    e = engine(budget=16, seqs=2)
    run, fired = e.runner._run, []

    def failing_run(packed, t, r, full, bitmask=None):
        if not fired and any(req.request_id == "fam#0" and req.output_token_ids for req in list(e.scheduler.running)):
            fired.append(1)
            e.runner._compiled[t, r].model(e.runner.weights, e.runner.kv_cache, e.runner.device_state, packed)
            raise RuntimeError("injected after the device consumed its inputs")
        return run(packed, t, r, full, bitmask)

    e.runner._run = failing_run
    _family_gets_exact_tokens(e, n=3, max_tokens=6)
    assert fired


def test_a_sampler_failing_after_the_model_ran_leaves_a_working_engine():
    # The model program consumed the donated cache and state; the sampler then fails to launch.
    # The step's requests recompute, and later requests still run.
    e = engine(budget=16, seqs=2)
    fired = []
    for (t, r), compiled in list(e.runner._compiled.items()):

        def failing(*args, _sampler=compiled.sampler):
            if not fired:
                fired.append(1)
                raise RuntimeError("injected: sampler launch failed")
            return _sampler(*args)

        e.runner._compiled[t, r] = dataclasses.replace(compiled, sampler=failing)
    _family_gets_exact_tokens(e, n=2, max_tokens=5)
    assert fired
    e.add_request("later", [4, 5, 6], SamplingParams(max_tokens=4, **GREEDY))
    assert _tokens_of(e, "later") == next_tokens([4, 5, 6], 4, V)


def test_outputs_queued_before_a_failed_read_back_are_not_lost(monkeypatch):
    from jaxserve.engine import runner

    config = EngineConfig(
        max_num_seqs=4,
        max_num_batched_tokens=16,
        page_size=4,
        num_kv_pages=64,
        max_model_len=256,
        min_token_bucket=8,
        async_scheduling=False,
    )
    e = LLMEngine(config, model=SumModel(V), progress=False, log=lambda *_: None)
    e.add_request("a", [1, 2, 3], SamplingParams(max_tokens=20, **GREEDY))
    e.add_request("b", [4, 5], SamplingParams(max_tokens=20, **GREEDY))
    for _ in range(3):
        e.step()
    read_back, failed_once = runner.ModelRunner.read_back, []

    def failing_read_back(self, step):
        if not failed_once:
            failed_once.append(1)
            raise RuntimeError("device error at read-back")
        return read_back(self, step)

    monkeypatch.setattr(runner.ModelRunner, "read_back", failing_read_back)
    e.abort_request("b")  # its final output waits to be returned by the next step
    final, _ = _drive(e)
    assert final["b"].outputs[0].finish_reason == "abort"
    assert final["a"].outputs[0].token_ids == next_tokens([1, 2, 3], 20, V)
    _no_leaks(e)


def test_prompt_logprobs_of_a_request_that_finishes_at_once(small):
    small.add_request("p", [1, 2, 3, 4, 5], SamplingParams(max_tokens=1, prompt_logprobs=1, **GREEDY))
    out = run(small, {})["p"]
    assert out.prompt_logprobs[0] is None and all(p is not None for p in out.prompt_logprobs[1:])


def test_children_waiting_on_shared_pages_do_not_starve_a_running_request():
    # 20 pages of 4 tokens, a replay of two fuzzed workloads that used to hang: a request needing
    # most of the pages preempted itself forever while forked n > 1 children waiting behind it
    # held the prompt's shared pages. Now those children give the pages up (and recompute).
    config = EngineConfig(
        max_num_seqs=4, max_num_batched_tokens=16, page_size=4, num_kv_pages=20, max_model_len=64, min_token_bucket=8
    )
    e = LLMEngine(config, model=SumModel(V, eos_token_id=7), progress=False, log=lambda *_: None)
    for trial in (0, 1):
        rng = np.random.default_rng(trial)
        arrivals = {}
        for i in range(int(rng.integers(3, 10))):
            kind, plen = int(rng.integers(0, 6)), int(rng.integers(1, 30))
            mt = int(rng.integers(1, 64 - plen)) if rng.random() < 0.8 else None
            kw = {
                0: lambda: dict(temperature=0),
                1: lambda: dict(temperature=0.9, seed=i, presence_penalty=0.7, frequency_penalty=0.3),
                2: lambda: dict(temperature=0, stop_token_ids=[int(rng.integers(V))], min_tokens=min(3, mt or 3)),
                3: lambda: dict(temperature=1.0, seed=i, n=int(rng.integers(2, 4))),
                4: lambda: dict(temperature=0, logit_bias={int(rng.integers(V)): 5.0}, min_tokens=min(2, mt or 2)),
                5: lambda: dict(temperature=0.5, seed=i, n=2, top_k=5),
            }[kind]()  # noqa: B023
            arrivals.setdefault(int(rng.integers(0, 6)), []).append(
                (f"{trial}-r{i}", rng.integers(0, V, plen).tolist(), SamplingParams(max_tokens=mt, **kw))
            )
        final = run(e, arrivals, max_steps=2000)
        assert sorted(final) == sorted(rid for group in arrivals.values() for rid, _, _ in group)
    _no_leaks(e)


def test_the_step_workspace_is_measured_once_per_model_and_plan(tmp_path):
    from jaxserve.engine.memory_plan import step_workspace

    config = EngineConfig(cache_dir=tmp_path, max_num_seqs=4)
    model, calls = SumModel(V), []

    def measure():
        calls.append(1)
        return 1234 + len(calls)

    assert step_workspace(config, model, [(16, 4)], [], measure) == 1235
    assert step_workspace(config, model, [(16, 4)], [], measure) == 1235  # read back, not measured
    assert step_workspace(config, model, [(16, 4), (32, 4)], [], measure) == 1236  # another plan
    assert len(calls) == 2
    for record in (tmp_path / "workspace").iterdir():
        record.write_text("{")  # damaged (say, half-written by another process): measured again
    assert step_workspace(config, model, [(16, 4)], [], measure) == 1237


def test_a_second_start_loads_its_compiled_steps_instead_of_lowering_them(tmp_path, monkeypatch):
    # XLA on the CPU cannot always reload an executable it serialized in the same process, so the
    # serializer here keeps the compiled objects in memory: what is tested is the engine's use of
    # the cache (keys, files, no lowering on a hit), not XLA's serialization (GPU: bench_startup).
    from jaxserve.engine import executable_cache
    from jaxserve.engine.runner import ModelRunner

    kept, broken = [], []

    def deserialize(i, in_tree, out_tree, execution_devices):
        if broken:  # loads, then fails when run (say, a runtime the key did not capture)
            return lambda *args: (_ for _ in ()).throw(RuntimeError("injected: cached program fails"))
        return kept[i]

    fake = type(
        "FakeSerializer",
        (),
        {
            "serialize": staticmethod(lambda compiled: (kept.append(compiled) or len(kept) - 1, None, None)),
            "deserialize_and_load": staticmethod(deserialize),
        },
    )
    monkeypatch.setattr(executable_cache, "serialize_executable", fake)
    config = EngineConfig(
        max_num_seqs=4,
        max_num_batched_tokens=16,
        page_size=4,
        num_kv_pages=64,
        max_model_len=64,
        min_token_bucket=8,
        cache_dir=tmp_path,
        executable_cache=True,
    )
    first = LLMEngine(config, model=SumModel(V), progress=False, log=lambda *_: None)
    lowered, lower = [], ModelRunner._lower
    monkeypatch.setattr(ModelRunner, "_lower", lambda self, *key: lowered.append(key) or lower(self, *key))
    second = LLMEngine(config, model=SumModel(V), progress=False, log=lambda *_: None)
    assert second.plan.shapes and not lowered
    assert len(list((tmp_path / "executables").rglob("*.bin"))) == 3 * len(second.plan.shapes)
    other = dataclasses.replace(config, max_num_seqs=2)  # other shapes: another key, compiled afresh
    LLMEngine(other, model=SumModel(V), progress=False, log=lambda *_: None)
    assert lowered
    broken.append(1)
    lowered.clear()
    third = LLMEngine(config, model=SumModel(V), progress=False, log=lambda *_: None)  # compiles afresh
    assert len(lowered) == 3 * len(third.plan.shapes)
    for e in (first, second, third):
        e.add_request("a", [1, 2, 3], SamplingParams(max_tokens=6, **GREEDY))
    assert _tokens_of(first, "a") == _tokens_of(second, "a") == _tokens_of(third, "a") == next_tokens([1, 2, 3], 6, V)


def _tokens_of(e, request_id: str) -> list[int]:
    """Runs the engine to the end (nothing may fail) and returns that request's tokens."""
    final, failures = _drive(e)
    assert not failures
    return list(final[request_id].outputs[0].token_ids)


@pytest.mark.parametrize(
    "params,full",
    [
        (dict(temperature=0.0), False),
        (dict(temperature=1.0), False),
        (dict(temperature=1.0, top_k=V), False),  # no smaller than the vocabulary: no cut
        (dict(temperature=0.0, top_p=0.5), False),  # greedy rows draw nothing
        (dict(temperature=1.0, logprobs=0), False),  # the chosen token's logprob and rank only
        (dict(temperature=1.0, top_k=5), True),
        (dict(temperature=1.0, top_p=0.9), True),
        (dict(temperature=1.0, min_p=0.1), True),
        (dict(temperature=0.0, logprobs=3), True),  # top alternatives
    ],
)
def test_the_host_picks_the_sorting_sampler_only_for_rows_that_need_it(params, full):
    e = engine()
    stage, picked = e.runner._stage, []
    e.runner._stage = lambda out, t, r, changes=(): picked.append(stage(out, t, r, changes)) or picked[-1]
    e.add_request("x", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True, **params))
    e.add_request("plain", [4, 5], SamplingParams(max_tokens=2, **GREEDY))
    assert _tokens_of(e, "plain") == next_tokens([4, 5], 2, V)
    assert picked and all(p[1].needs_sort is full for p in picked)
