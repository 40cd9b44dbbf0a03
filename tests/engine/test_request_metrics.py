"""A request's timeline (RequestMetrics on its final output) and the per-step token count the engine
reports for metrics, on the mock model: stamps in order, queue time that covers a wait for a seat,
one timeline per family whatever its n, and steps that count the tokens they computed."""

from __future__ import annotations

import asyncio

import pytest

from jaxserve.engine.async_engine import AsyncLLM
from jaxserve.sampling_params import SamplingParams
from tests.engine.test_engine_mock import engine, run


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_timeline_in_order_and_queue_time_covers_the_wait_for_a_seat():
    e = engine(seqs=1)  # b waits until a has finished
    final = run(e, {0: [("a", [1, 2, 3, 4, 5], greedy(4)), ("b", [6, 7, 8], greedy(3))]})
    a, b = final["a"].metrics, final["b"].metrics
    for t in (a, b):
        assert t.queued <= t.scheduled <= t.first_token < t.last_token
        assert t.inference_time == pytest.approx(t.prefill_time + t.decode_time)
    assert b.scheduled >= a.last_token and b.queue_time >= a.inference_time


def test_one_timeline_per_family_whatever_its_n():
    e = engine(page_size=4)
    final = run(e, {0: [("f", list(range(1, 10)), greedy(3, n=2))]})  # 8 shared tokens: a prefix request
    out = final["f"]
    assert [len(c.token_ids) for c in out.outputs] == [3, 3]
    t = out.metrics
    assert t is not None and t.queued <= t.scheduled <= t.first_token < t.last_token


def test_an_aborted_request_has_no_timeline():
    e = engine()
    e.add_request("x", [1, 2, 3], greedy(50))
    e.step()
    e.abort_request("x")
    (out,) = e.step()
    assert out.finished and out.outputs[0].finish_reason == "abort" and out.metrics is None
    e.block_until_idle()


def test_each_step_reports_the_tokens_it_computed():
    steps = []
    llm = AsyncLLM(engine(), on_step=steps.append)

    async def main():
        async for out in llm.generate({"prompt_token_ids": list(range(1, 10))}, greedy(5)):
            last = out
        return last

    try:
        out = asyncio.run(main())
    finally:
        llm.shutdown()
    assert len(out.outputs[0].token_ids) == 5
    # the 9 prompt tokens, then each sampled token but the last as the next step's input
    assert sum(s.num_tokens for s in steps) == 9 + 5 - 1
    assert all(a.timestamp < b.timestamp for a, b in zip(steps, steps[1:]))
