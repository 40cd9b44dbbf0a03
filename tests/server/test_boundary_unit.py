"""The request boundary without an engine: strict JSON bodies, errors that always encode, the body
limit, a client that leaves mid-body, the API key's routes and 405's Allow, on a small Starlette app
built from the server's own middleware, exception handlers and read_model."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from jaxserve.api.errors import APIError, model_not_found
from jaxserve.api.json_body import MAX_DEPTH, MAX_INT_DIGITS, parse_json_object
from jaxserve.api.protocol import CompletionRequest
from jaxserve.server.app_factory import EXCEPTION_HANDLERS
from jaxserve.server.http import APIKeyMiddleware, read_model

LIMIT = 1000
KEY = "k"


def refused(body: bytes) -> str:
    with pytest.raises(APIError) as e:
        parse_json_object(body)
    assert e.value.status == 400
    json.dumps(e.value.body()).encode()  # always encodable
    return e.value.message


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
def test_non_finite_numbers_are_refused(literal):
    assert literal.lstrip("-") in refused(f'{{"temperature": {literal}}}'.encode())


def test_integers_are_bounded_before_int_sees_them():
    assert parse_json_object(f'{{"seed": {"9" * MAX_INT_DIGITS}}}'.encode())["seed"] == int("9" * MAX_INT_DIGITS)
    assert "5000 digits" in refused(b'{"max_tokens": ' + b"7" * 5000 + b"}")
    assert "digits" in refused(b'{"seed": -' + b"7" * 40 + b"}")


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 10_000])
def test_nesting_is_bounded(depth):
    body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    assert f"deeper than {MAX_DEPTH}" in refused(body)
    ok = b'{"prompt": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
    parse_json_object(ok)


@pytest.mark.parametrize(
    "body",
    [
        rb'{"prompt": "hi \ud800 there"}',
        rb'{"messages": [{"role": "user", "content": "\udfff"}]}',
        rb'{"model": "x\udc00"}',
        rb'{"logit_bias": {"\ud83d": 1}}',  # a key
        rb'{"stop": ["ok", ["\ud800"]]}',
    ],
)
def test_lone_surrogates_are_refused(body):
    assert "surrogate" in refused(body)


def test_valid_unicode_and_pairs_pass():
    body = '{"prompt": "👩👩 你好 \\ud83d\\ude00 \\u0000 control \\u001f"}'.encode()
    assert parse_json_object(body)["prompt"] == "👩👩 你好 😀 \x00 control \x1f"


def test_not_utf8_not_json_not_an_object():
    assert "UTF-8" in refused(b'{"prompt": "\xff"}')
    assert "not valid JSON" in refused(b'{"prompt": ')
    assert "JSON object" in refused(b"[1]")


def test_an_error_that_echoes_a_surrogate_still_encodes():
    e = model_not_found("gpt\ud800")
    assert "gpt\\ud800" in e.message
    json.dumps(e.body(), ensure_ascii=False).encode("utf-8")


def test_request_models_refuse_non_finite_floats():
    with pytest.raises(ValueError, match="finite"):
        CompletionRequest(prompt="x", temperature=float("inf"))


# -- the HTTP side ---------------------------------------------------------------------------------


async def _echo(request):
    body = await read_model(request, CompletionRequest, LIMIT)
    return JSONResponse({"prompt": body.prompt})


async def _ok(request):
    return Response("ok")


def _app() -> Starlette:
    routes = [Route("/v1/completions", _echo, methods=["POST"])]
    routes += [Route(p, _ok, methods=["GET", "POST"]) for p in ("/health", "/metrics", "/version", "/tokenize")]
    return Starlette(
        routes=routes,
        middleware=[Middleware(APIKeyMiddleware, api_key=KEY)],
        exception_handlers=EXCEPTION_HANDLERS,
    )


@pytest.fixture
def client():
    with TestClient(_app(), raise_server_exceptions=True, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def test_405_names_the_allowed_methods(client):
    r = client.get("/v1/completions")
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_every_route_but_health_and_metrics_needs_the_key():
    with TestClient(_app()) as anonymous:
        for path in ("/tokenize", "/version", "/v1/completions", "/nowhere"):
            r = anonymous.post(path, content=b"{}")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get("/metrics").status_code == 200


def test_a_body_over_the_limit_is_413_whether_declared_or_chunked(client):
    big = json.dumps({"prompt": "x" * LIMIT}).encode()
    assert client.post("/v1/completions", content=big).status_code == 413
    chunked = client.post("/v1/completions", content=iter([big[:600], big[600:]]))  # no Content-Length
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    assert client.post("/v1/completions", json={"prompt": "x" * 100}).json() == {"prompt": "x" * 100}


def test_a_client_that_leaves_mid_body_is_answered_quietly():
    """Starlette raises ClientDisconnect from the body stream; it must not escape the app (uvicorn
    would log 'Exception in ASGI application' with a traceback)."""
    messages = [
        {"type": "http.request", "body": b'{"prompt": ', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"authorization", f"Bearer {KEY}".encode()), (b"content-length", b"500")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "scheme": "http",
    }
    asyncio.run(_app()(scope, receive, send))  # raised ClientDisconnect before the fix
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400
