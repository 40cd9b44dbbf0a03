"""Prefix caching seen from the API: usage.prompt_tokens_details.cached_tokens, the request's
cache_salt, the prefix-cache counters on /metrics and POST /reset_prefix_cache."""

from __future__ import annotations

import random

from tests.server.conftest import API_KEY, MODEL_NAME, metric_values, wait_idle

GREEDY = dict(temperature=0, max_tokens=4, extra_body={"ignore_eos": True})
PAGE = 16  # the server's default page size


def unique_prompt(n: int) -> list[int]:
    rng = random.Random()
    return [rng.randrange(100, 49000) for _ in range(n)]


def cached_tokens(response) -> int:
    return response.usage.prompt_tokens_details.cached_tokens


def test_cached_tokens_salt_metrics_and_reset(client, http):
    prompt = unique_prompt(3 * PAGE + 5)
    before = wait_idle(http)
    first = client.completions.create(model=MODEL_NAME, prompt=prompt, **GREEDY)
    second = client.completions.create(model=MODEL_NAME, prompt=prompt[: 3 * PAGE] + [7, 8], **GREEDY)
    assert cached_tokens(first) == 0 and cached_tokens(second) == 3 * PAGE
    after = metric_values(http)
    assert (
        after["jaxserve:prefix_cache_queries_total"] - before["jaxserve:prefix_cache_queries_total"]
        == 2 * len(prompt) - 3
    )
    assert after["jaxserve:prefix_cache_hits_total"] - before["jaxserve:prefix_cache_hits_total"] == 3 * PAGE

    salted = dict(GREEDY, extra_body={"ignore_eos": True, "cache_salt": "tenant-a"})
    assert cached_tokens(client.completions.create(model=MODEL_NAME, prompt=prompt, **salted)) == 0
    assert cached_tokens(client.completions.create(model=MODEL_NAME, prompt=prompt, **salted)) == 3 * PAGE

    wait_idle(http)
    assert http.post("/reset_prefix_cache").status_code == 200
    again = client.completions.create(model=MODEL_NAME, prompt=prompt, **GREEDY)
    assert cached_tokens(again) == 0 and again.choices[0].text == first.choices[0].text


def test_chat_usage_streamed_counts_the_cached_turn(client):
    messages = [{"role": "system", "content": "You are a terse assistant. " * 12}, {"role": "user", "content": "Hi"}]
    client.chat.completions.create(model=MODEL_NAME, messages=messages, **GREEDY)
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages[:1] + [{"role": "user", "content": "Hello there"}],
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    usage = [c.usage for c in stream if c.usage is not None][-1]
    assert usage.prompt_tokens_details.cached_tokens >= PAGE
    assert usage.prompt_tokens_details.cached_tokens % PAGE == 0


def test_reset_needs_the_key_and_post(server):
    import httpx

    assert httpx.post(f"{server.url}/reset_prefix_cache").status_code == 401
    r = httpx.get(f"{server.url}/reset_prefix_cache", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 405


def test_the_switch_from_the_environment_and_the_command_line():
    import argparse

    from jaxserve.app import settings_from_env
    from jaxserve.cli import _add_serve_parser

    assert settings_from_env({}).engine.enable_prefix_caching
    assert not settings_from_env({"JAXSERVE_ENABLE_PREFIX_CACHING": "0"}).engine.enable_prefix_caching
    parser = argparse.ArgumentParser()
    _add_serve_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["serve"]).enable_prefix_caching
    assert not parser.parse_args(["serve", "--no-enable-prefix-caching"]).enable_prefix_caching
    assert parser.parse_args(["serve", "--enable-prefix-caching"]).enable_prefix_caching


def test_cache_salt_reaches_the_sampling_params_and_is_checked():
    import pytest

    from jaxserve.api.errors import APIError
    from jaxserve.api.protocol import CompletionRequest
    from jaxserve.api.translate import completion_params

    assert completion_params(CompletionRequest(prompt="x", cache_salt="t")).cache_salt == "t"
    with pytest.raises(APIError, match="cache_salt"):
        completion_params(CompletionRequest(prompt="x", cache_salt=""))
