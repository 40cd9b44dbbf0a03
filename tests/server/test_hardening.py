"""Issue 14's findings against the live test server: bodies that used to reach a 500 (huge integers,
deep nesting, lone surrogates), NaN and Infinity, 405 without Allow, stop strings taken in list
order, logprob bytes spelled from U+FFFD, a body cut off mid-way, unguarded /tokenize and no
body limit. Each test here failed before its fix."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import API_KEY
from tests.server.test_errors import CHAT, COMPLETIONS, MESSAGES, error_of

JSON = {"Content-Type": "application/json"}
EMOJI_PIECE = 10813  # SmolLM2's "ðŁ": the bytes F0 9F that begin "👩" (and most emoji)
PARIS = 7042  # SmolLM2's " Paris", one token


def post_raw(http, path: str, body: bytes) -> httpx.Response:
    return http.post(path, content=body, headers=JSON)


@pytest.mark.parametrize(
    "path, body",
    [
        (COMPLETIONS, b'{"prompt": "hi", "temperature": ' + b"1" * 5000 + b"}"),
        (COMPLETIONS, b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}"),
        (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "seed": -' + b"3" * 5000 + b"}"),
        ("/tokenize", b'{"prompt": "hi", "add_special_tokens": ' + b"1" * 5000 + b"}"),
        (COMPLETIONS, b"[" * 10_000 + b"]" * 10_000),
        (COMPLETIONS, b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"),
        (CHAT, b'{"messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"),
        ("/tokenize", b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"),
        (COMPLETIONS, rb'{"prompt": "hi \ud800 there", "max_tokens": 1}'),
        (CHAT, rb'{"messages": [{"role": "user", "content": "hi \ud800 there"}], "max_tokens": 1}'),
        ("/tokenize", rb'{"prompt": "hi \ud800 there"}'),
        ("/tokenize", rb'{"messages": [{"role": "user", "content": "\udc00"}]}'),
        (COMPLETIONS, rb'{"model": "gpt\ud800", "prompt": "hi"}'),
    ],
)
def test_bodies_that_reached_a_500_are_400(http, path, body):
    e = error_of(post_raw(http, path, body), 400)
    assert e["type"] == "invalid_request_error"


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty", "top_p", "presence_penalty"])
@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_nan_and_infinity_are_400(http, field, literal):
    body = b'{"prompt": "hi", "max_tokens": 2, "%s": %s}' % (field.encode(), literal)
    error_of(post_raw(http, COMPLETIONS, body), 400)


def test_405_has_allow(http):
    r = http.get(COMPLETIONS)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    error_of(r, 405)


def test_with_a_key_every_route_but_health_and_metrics_needs_it(server):
    for method, path in (("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/version"), ("GET", "/v1/models")):
        e = error_of(httpx.request(method, server.url + path, json={"prompt": "hi", "tokens": [1]}), 401)
        assert e["code"] == "invalid_api_key", path
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_a_body_over_the_limit_is_413(server):
    """The default limit (16 MiB): a 20 MB /tokenize body is refused from its Content-Length, before it is read."""
    body = b'{"prompt": "' + b"x" * 20_000_000 + b'"}'
    headers = dict(JSON, Authorization=f"Bearer {API_KEY}")
    r = httpx.post(server.url + "/tokenize", content=body, headers=headers, timeout=60)
    assert error_of(r, 413)["code"] == "request_too_large"


def _full_log(server) -> str:
    server.log.flush()
    return Path(server.log.name).read_text()


def _send_and_hang_up(server, head: bytes, body: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(head + b"\r\n" + body)
        time.sleep(0.2)  # the handler is reading the body when the client goes


def test_a_body_cut_off_midway_logs_no_error(server, http):
    start = len(_full_log(server))
    head = f"POST {COMPLETIONS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n".encode()
    _send_and_hang_up(server, head + b"Content-Length: 1000\r\n", b'{"prompt": "hi')
    _send_and_hang_up(server, head + b"Transfer-Encoding: chunked\r\n", b'20\r\n{"prompt": "hi')
    http.get("/health")
    time.sleep(0.5)
    log = _full_log(server)[start:]
    assert "ClientDisconnect" not in log and "Exception in ASGI application" not in log, log


def test_stop_strings_end_at_their_earliest_match(http):
    """The issue's case: a reply forced to " Paris" and stop ["a", ..., "z", "P"]: both "a" and "P"
    complete in the same token; "P" comes first in the text."""
    stop = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["P"]
    body = {"prompt": "hi", "max_tokens": 3, "temperature": 0, "logit_bias": {str(PARIS): 100}, "stop": stop}
    choice = http.post(COMPLETIONS, json=body).json()["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (" ", "stop", "P")


def test_chat_logprobs_carry_the_tokens_own_bytes(http):
    """A reply forced to the first piece of an emoji: its bytes are F0 9F, not U+FFFD's EF BF BD."""
    body = {
        "messages": MESSAGES,
        "max_tokens": 3,
        "temperature": 0,
        "logit_bias": {str(EMOJI_PIECE): 100},
        "logprobs": True,
        "top_logprobs": 2,
    }
    r = http.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for entry in content:
        assert entry["bytes"] == [0xF0, 0x9F] and entry["token"] == "bytes:\\xf0\\x9f"
        for alt in entry["top_logprobs"]:
            spelled = alt["token"].encode() if not alt["token"].startswith("bytes:") else None
            assert spelled is None or spelled == bytes(alt["bytes"])


def test_completion_logprobs_name_tokens_by_their_bytes(http):
    body = {"prompt": "hi", "max_tokens": 2, "temperature": 0, "logit_bias": {str(EMOJI_PIECE): 100}, "logprobs": 1}
    r = http.post(COMPLETIONS, json=body)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["bytes:\\xf0\\x9f"] * 2
    assert lp["text_offset"] == [0, 0]  # no character is complete yet
    assert json.dumps(lp)  # the alternatives' keys too
