"""Every refusal in OpenAI's shape {"error": {"message", "type", "param", "code"}} with its status:
400 (body, types, ranges, prompt xor messages, context length), 401, 404, 503 + Retry-After, and
500 for an engine failure on one request while the server serves on."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, FAULT_TOKEN, MAX_MODEL_LEN, MAX_NUM_SEQS, MAX_WAITING, MODEL_NAME, wait_idle

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("body", [b'{"prompt": "hi", "max_tokens": 4', b"[1, 2]", b"not json"])
def test_malformed_json_is_400(http, body):
    error_of(http.post(COMPLETIONS, content=body, headers={"Content-Type": "application/json"}), 400)


def test_invalid_utf8_is_400(http):
    body = b'{"prompt": "\xff\xfe"}'
    e = error_of(http.post(COMPLETIONS, content=body, headers={"Content-Type": "application/json"}), 400)
    assert "UTF-8" in e["message"]


@pytest.mark.parametrize(
    "path, body, param",
    [
        (COMPLETIONS, {"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
        (COMPLETIONS, {"prompt": 42}, "prompt"),
        (COMPLETIONS, {"prompt": "hi", "stream": "yes"}, "stream"),
        (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (CHAT, {"messages": "hi"}, "messages"),
    ],
)
def test_wrong_types_are_400(http, path, body, param):
    assert error_of(http.post(path, json=body), 400)["param"].startswith(param)


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("n", 0),
        ("max_tokens", 0),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("logprobs", 21),
        ("top_k", -5),
        ("min_p", 2.0),
        ("repetition_penalty", 0.0),
    ],
)
def test_out_of_range_values_are_400(http, field, value):
    e = error_of(http.post(COMPLETIONS, json={"prompt": "hi", field: value}), 400)
    assert e["param"] == field and e["type"] == "invalid_request_error"


def test_logit_bias_and_token_ids_out_of_vocabulary_are_400(http):
    error_of(http.post(COMPLETIONS, json={"prompt": "hi", "logit_bias": {"x": 1}}), 400)
    error_of(http.post(COMPLETIONS, json={"prompt": [10**9]}), 400)
    error_of(http.post(COMPLETIONS, json={"prompt": []}), 400)


@pytest.mark.parametrize(
    "path, body",
    [
        (COMPLETIONS, {"prompt": "hi", "messages": MESSAGES}),
        (CHAT, {"prompt": "hi", "messages": MESSAGES}),
        (COMPLETIONS, {}),
        (CHAT, {}),
        (CHAT, {"messages": []}),
    ],
)
def test_prompt_xor_messages(http, path, body):
    error_of(http.post(path, json=body), 400)


def test_unknown_model_is_404(http, client):
    e = error_of(http.post(COMPLETIONS, json={"model": "gpt-9", "prompt": "hi"}), 404)
    assert e["code"] == "model_not_found" and e["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)


def test_context_length_is_400_with_the_sentence_clients_parse(http, client):
    e = error_of(http.post(COMPLETIONS, json={"prompt": "hi " * 200, "max_tokens": 100}), 400)
    assert e["message"].startswith(
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested "
    )
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x " * 300}])


def test_missing_or_wrong_api_key_is_401(server):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": API_KEY}):
        e = error_of(httpx.post(server.url + COMPLETIONS, json={"prompt": "hi"}, headers=headers), 401)
        assert e["type"] == "authentication_error"
    assert httpx.get(server.url + "/health").status_code == 200  # /health and /metrics stay open


def test_full_queue_is_503_with_retry_after(server, http):
    """Fill the queue (max_num_seqs + max_waiting_requests sequences) with long streams; the next is 503."""
    wait_idle(http)
    capacity = MAX_NUM_SEQS + MAX_WAITING
    n = 20
    holders, started = [], threading.Barrier(capacity // n + 1)
    stop = threading.Event()

    def hold():
        body = {"prompt": "x", "n": n, "max_tokens": 200, "ignore_eos": True, "stream": True}
        with http.stream("POST", COMPLETIONS, json=body) as r:
            assert r.status_code == 200
            started.wait()
            for _ in r.iter_bytes():  # stay until told to go: leaving aborts the request
                if stop.is_set():
                    break

    for _ in range(capacity // n):
        t = threading.Thread(target=hold)
        t.start()
        holders.append(t)
    started.wait(timeout=60)
    try:
        r = http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 1})
        e = error_of(r, 503)
        assert r.headers["Retry-After"] == "1" and e["code"] == "queue_full"
    finally:
        stop.set()
        for t in holders:
            t.join(timeout=60)
    assert wait_idle(http)["jaxserve:kv_cache_usage_perc"] == 0  # the holders' requests were aborted


def test_engine_failure_is_500_for_that_request_and_the_server_serves_on(http, client):
    e = error_of(http.post(COMPLETIONS, json={"prompt": [5, FAULT_TOKEN, 6], "max_tokens": 4}), 500)
    assert e["type"] == "server_error" and "injected failure" in e["message"]
    with http.stream("POST", COMPLETIONS, json={"prompt": [FAULT_TOKEN], "max_tokens": 4, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line]
    assert '"error"' in events[-2] and events[-1] == "data: [DONE]"  # headers were sent: the error is an event
    ok = client.completions.create(model=MODEL_NAME, prompt="still here?", max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")
    assert http.get("/health").status_code == 200


def test_more_sequences_than_the_queue_holds_is_400_not_503(http):
    e = error_of(http.post(COMPLETIONS, json={"prompt": ["a", "b"], "n": MAX_NUM_SEQS + MAX_WAITING}), 400)
    assert e["param"] == "n"
