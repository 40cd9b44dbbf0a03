"""Many clients at once: 64 concurrent streams, a third of them hanging up midway. The others get
exactly what they would get alone, and every KV page comes back. A non-streaming client that
hangs up aborts too. /metrics is read with prometheus_client's own parser."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from openai import AsyncOpenAI

from tests.server.conftest import API_KEY, MODEL_NAME, metric_values, wait_idle

PROMPTS = ["The quick brown fox", "In a hole in the ground", "It was a bright cold day", "Call me Ishmael"]
MAX_TOKENS = 24
GREEDY = dict(temperature=0, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
HANG_UP_MAX_TOKENS = 200  # of MAX_MODEL_LEN = 256


def finished(m: dict) -> float:
    return sum(v for k, v in m.items() if k.startswith("jaxserve:request_success_total"))


def test_64_streams_with_a_third_disconnecting(server, client, http):
    alone = {p: client.completions.create(model=MODEL_NAME, prompt=p, **GREEDY).choices[0].text for p in PROMPTS}
    before = wait_idle(http)

    async def one(aclient: AsyncOpenAI, i: int):
        prompt = PROMPTS[i % len(PROMPTS)]
        hangs_up = i % 3 == 0
        # A client that hangs up asks for far more tokens than it reads, so that the server cannot
        # finish it before the disconnect reaches it however slow the machine is.
        params = dict(GREEDY, max_tokens=HANG_UP_MAX_TOKENS) if hangs_up else GREEDY
        stream = await aclient.completions.create(model=MODEL_NAME, prompt=prompt, stream=True, **params)
        text, reason, chunks = "", None, 0
        async for chunk in stream:
            chunks += 1
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
            if hangs_up and chunks == 3:
                await stream.close()  # hang up midway
                return None
        return prompt, text, reason

    async def main():
        # one connection per client, so that closing a stream really drops its TCP connection
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with AsyncOpenAI(
            base_url=f"{server.url}/v1",
            api_key=API_KEY,
            max_retries=0,
            http_client=httpx.AsyncClient(limits=limits, timeout=120),
        ) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(64)))

    results = asyncio.run(main())
    completed = [r for r in results if r is not None]
    assert len(completed) == 64 - len(range(0, 64, 3))
    for prompt, text, reason in completed:
        assert reason == "length" and text == alone[prompt], prompt
    after = wait_idle(http)
    assert after["jaxserve:kv_cache_usage_perc"] == 0
    assert after["jaxserve:num_requests_running"] == 0 and after["jaxserve:num_requests_waiting"] == 0
    assert finished(after) - finished(before) == len(completed)  # the disconnected were aborted, not finished


def test_non_streaming_client_that_hangs_up_is_aborted(server, http):
    before = wait_idle(http)
    body = {"prompt": "x", "n": 16, "max_tokens": 250, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=httpx.Timeout(120, read=0.3),
        )
    after = wait_idle(http)
    assert after["jaxserve:kv_cache_usage_perc"] == 0
    assert finished(after) == finished(before)  # none of the 16 sequences ran to its end
    assert after["jaxserve:generation_tokens_total"] - before["jaxserve:generation_tokens_total"] < 16 * 250


def test_metrics_have_vllm_names_and_count(client, http):
    before = wait_idle(http)  # aborts of earlier tests' requests are settled
    r = client.completions.create(model=MODEL_NAME, prompt="count me", **GREEDY)
    after = metric_values(http)
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "num_preemptions_total",
        "prompt_tokens_total",
        "generation_tokens_total",
        "time_to_first_token_seconds_count",
        "inter_token_latency_seconds_count",
        "e2e_request_latency_seconds_count",
        "request_success_total{finished_reason=length}",
    ):
        assert "jaxserve:" + name in after, name
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["jaxserve:prompt_tokens_total"] == r.usage.prompt_tokens
    assert delta["jaxserve:generation_tokens_total"] == MAX_TOKENS
    assert delta["jaxserve:time_to_first_token_seconds_count"] == 1
    assert delta["jaxserve:e2e_request_latency_seconds_count"] == 1
    assert delta["jaxserve:inter_token_latency_seconds_count"] == MAX_TOKENS - 1
    assert delta["jaxserve:request_success_total{finished_reason=length}"] == 1
