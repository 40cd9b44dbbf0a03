"""AsyncLLM: streaming from the engine thread into asyncio, aborts on early exit, clean errors."""

from __future__ import annotations

import asyncio

import pytest

from jaxserve.engine.async_engine import AsyncLLM
from jaxserve.sampling_params import SamplingParams
from tests.engine.mock_model import next_tokens
from tests.engine.test_engine_mock import V, engine


@pytest.fixture(scope="module")
def async_llm():
    llm = AsyncLLM(engine())
    yield llm
    llm.shutdown()


def test_streams_concurrent_requests_and_aborts_early_leavers(async_llm):
    async def consume(prompt, n_tokens, stop_after=None):
        seen = []
        async for out in async_llm.generate(
            prompt, SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True)
        ):
            seen.append(list(out.outputs[0].token_ids))
            if stop_after is not None and len(seen) >= stop_after:
                break
        return seen

    async def main():
        return await asyncio.gather(
            *(consume([i + 1, 2, 3], 12, stop_after=3 if i % 3 == 0 else None) for i in range(9))
        )

    results = asyncio.run(main())
    for i, seen in enumerate(results):
        if i % 3 == 0:
            assert len(seen) == 3
        else:
            assert seen[-1] == next_tokens([i + 1, 2, 3], 12, V)
            assert all(seen[k] == seen[-1][: len(seen[k])] for k in range(len(seen)))  # cumulative stream
    e = async_llm.engine
    for _ in range(100):  # the aborts land on the engine thread
        if not e.has_unfinished_requests():
            break
        asyncio.run(asyncio.sleep(0.01))
    assert e.scheduler.kv.num_free_pages == e.scheduler.kv.num_pages


def test_bad_input_raises_in_the_caller(async_llm):
    async def main():
        async for _ in async_llm.generate([], SamplingParams()):
            pass

    with pytest.raises(ValueError, match="empty"):
        asyncio.run(main())
