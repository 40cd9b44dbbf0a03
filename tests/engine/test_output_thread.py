"""AsyncLLM keeps per-token Python off the engine thread: detokenizing and stop strings run on the
event loop, and a stop string still ends its request (text cut at the stop, pages freed)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from jaxserve.engine import output_processor
from jaxserve.engine.async_engine import AsyncLLM
from jaxserve.sampling_params import SamplingParams
from tests.engine.mock_model import next_tokens
from tests.engine.test_engine_mock import V, engine


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    from jaxserve.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_folder)


def test_detokenizing_runs_on_the_event_loop_and_a_stop_string_ends_the_request(tokenizer, monkeypatch):
    threads = set()
    push = output_processor.IncrementalDetokenizer.push

    def recording_push(self, token_id):
        threads.add(threading.current_thread().name)
        return push(self, token_id)

    monkeypatch.setattr(output_processor.IncrementalDetokenizer, "push", recording_push)
    prompt = [5, 7, 11]
    tokens = next_tokens(prompt, 12, V)  # the mock's tokens, as text through SmolLM2's vocabulary
    full = tokenizer.decode(tokens, skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    llm = AsyncLLM(engine(tokenizer=tokenizer))
    e = llm.engine
    try:

        async def last(params):
            outs = [out async for out in llm.generate(prompt, params)]
            return outs[-1]

        plain = asyncio.run(last(SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)))
        stopped = asyncio.run(last(SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])))
        for _ in range(500):  # the stop reaches the engine thread as a command: let it land
            if not e.has_unfinished_requests():
                break
            time.sleep(0.01)
    finally:
        llm.shutdown()
    assert plain.outputs[0].text == full
    out = stopped.outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[: full.find(stop)]
    assert threads and "jaxserve-engine" not in threads  # never on the engine thread
    assert not e.has_unfinished_requests()
    e.block_until_idle()
    assert e.scheduler.kv.num_free_pages == e.scheduler.kv.num_pages
