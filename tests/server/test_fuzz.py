"""Property-based fuzzing of the live test server (hypothesis): FUZZ_EXAMPLES requests, or as many
as fit in FUZZ_SECONDS (the examples past it send nothing).

Bodies start from a small valid request per endpoint and give some of the request model's own
fields extreme or wrong values: huge and negative integers, NaN and infinities, random Unicode
with lone surrogates and control characters, random nesting, JSON text no encoder writes (5,000
digits, 3,000 levels deep); or the whole body is junk. They go to both generating endpoints,
/tokenize and /detokenize.

Property: never a 5xx; every 4xx in OpenAI's error shape; no stream event is a server error; no
traceback in the server's log; and afterwards the server answers the canary request (greedy)
with the text it gave before.
"""

from __future__ import annotations

import collections
import json
import os
import time
import types
import typing
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from jaxserve.api.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from tests.server.conftest import FAULT_TOKEN
from tests.server.test_errors import CHAT, COMPLETIONS

# 1000 take ~15 s on a 2-core CPU; a longer hunt: JAXSERVE_FUZZ_EXAMPLES=5000 pytest -s tests/server/test_fuzz.py
FUZZ_EXAMPLES = int(os.environ.get("JAXSERVE_FUZZ_EXAMPLES", "1000"))
FUZZ_SECONDS = float(os.environ.get("JAXSERVE_FUZZ_SECONDS", "40"))
CANARY = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}

ENDPOINTS = {
    COMPLETIONS: (CompletionRequest, {"prompt": "hi", "max_tokens": 2}),
    CHAT: (ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    "/tokenize": (TokenizeRequest, {"prompt": "hi"}),
    "/detokenize": (DetokenizeRequest, {"tokens": [1, 2]}),
}


class Raw(str):
    """JSON text put into the body verbatim."""


RAW = st.sampled_from(
    [
        "NaN",
        "-Infinity",
        "1e999",
        "9" * 5000,
        "-" + "1" * 40,
        "[" * 3000 + "]" * 3000,
        '{"a": ' * 100 + "1" + "}" * 100,
        '"\\ud800"',
        '"tail \\udfff"',
    ]
).map(Raw)

PLAIN_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)  # control characters included
TEXT = st.one_of(
    PLAIN_TEXT,
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),  # lone surrogates
    st.sampled_from(["", "\x00", "👩👩", "你好世界", "<|im_end|>", "<|im_start|>", " Paris", "x" * 2000]),
)
INTS = st.one_of(
    st.integers(-3, 300),
    st.sampled_from([-(2**63), 2**63, 2**64, 10**31, -(10**31), 2**31, 49151, 49152, -1, 0]),
    st.integers(),
).filter(lambda i: i != FAULT_TOKEN)  # that id makes the engine fail on purpose (test_errors)
FLOATS = st.one_of(
    st.floats(),  # NaN and infinities included
    st.sampled_from([1e-50, 1e-45, 5e-324, 1e308, -0.0, 0.0, 0.5, 1.0, 2.0, 100.0, -100.0]),
)
LEAVES = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT, RAW, st.lists(INTS, max_size=12))
VALUES = st.recursive(
    LEAVES, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4), max_leaves=10
)
BY_TYPE = {int: INTS, float: FLOATS, bool: st.booleans(), str: PLAIN_TEXT | TEXT, type(None): st.none()}


def typed(annotation) -> st.SearchStrategy:
    """Values of a field's type, extreme ones included: what a request model's field might receive."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in BY_TYPE:
        return BY_TYPE[annotation]
    if origin in (types.UnionType, typing.Union):
        return st.one_of([typed(a) for a in args])
    if origin is typing.Literal:
        return st.sampled_from(args) | PLAIN_TEXT
    if origin is list:
        return st.lists(typed(args[0]), max_size=5)
    if origin is dict:  # logit_bias: token ids as strings, mostly
        return st.dictionaries(INTS.map(str) | PLAIN_TEXT, typed(args[1]), max_size=4)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        fields = {name: typed(f.annotation) for name, f in annotation.model_fields.items()}
        return st.fixed_dictionaries({}, optional=fields)
    return VALUES  # `object` and the like


@st.composite
def requests(draw) -> tuple[str, bytes]:
    """A small valid request with up to 3 fields drawn from the model (1 in 5 of them anything at
    all), or 1 time in 10 a body of junk."""
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    model, base = ENDPOINTS[path]
    fields = model.model_fields
    body = dict(base)
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True)):
        wild = draw(st.integers(0, 4)) == 0
        body[name] = draw(VALUES if wild else typed(fields[name].annotation))
    if draw(st.integers(0, 9)) == 0:
        body = draw(VALUES)
    return path, _encode(body, draw)


def _encode(body, draw) -> bytes:
    """JSON with Raw values in place; as ASCII escapes, as UTF-8 (a surrogate becomes invalid bytes),
    or cut short."""
    raws: list[Raw] = []

    def swap(v):
        if isinstance(v, Raw):
            raws.append(v)
            return f"@@raw{len(raws) - 1}@@"
        if isinstance(v, list):
            return [swap(x) for x in v]
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        return v

    how = draw(st.sampled_from(["ascii", "ascii", "utf-8", "utf-8", "cut"]))
    text = json.dumps(swap(body), ensure_ascii=how != "utf-8")
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@raw{i}@@"', raw, 1)
    data = text.encode("utf-8", "surrogatepass")
    return data[: draw(st.integers(0, max(0, len(data) - 1)))] if how == "cut" else data


def _full_log(server) -> str:
    server.log.flush()
    return Path(server.log.name).read_text()


def _check(response) -> None:
    assert response.status_code < 500, response.text[:2000]
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in response.text.splitlines():
            assert '"server_error"' not in line, line


def _canary(http) -> str:
    r = http.post(COMPLETIONS, json=CANARY)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_no_body_reaches_a_5xx_and_the_server_answers_the_canary_after(server, http):
    canary_text, log_start = _canary(http), len(_full_log(server))
    started, seen = time.monotonic(), collections.Counter()

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests())
    def fuzz(request):
        if time.monotonic() - started > FUZZ_SECONDS:
            return
        path, body = request
        response = http.post(path, content=body, headers={"Content-Type": "application/json"}, timeout=60)
        seen[f"{path} {response.status_code}"] += 1
        _check(response)

    fuzz()
    log = _full_log(server)[log_start:]
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-5000:]
    assert _canary(http) == canary_text
    assert http.get("/health").status_code == 200
    print(f"fuzzed in {time.monotonic() - started:.1f} s: {sorted(seen.items())}")
