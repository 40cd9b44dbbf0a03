"""Structured outputs and tool calling through the server, with the official openai client and the
embedded SmolLM2-135M-Instruct (real weights), started once for this module with the hermes
tool-call parser. Every constrained reply must parse and validate; bad grammars get a 400 and the
server serves on. max_tokens stays small: CI is a 2-core machine."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from tests.server.conftest import ServerProcess, free_port

API_KEY = "structured-key"
MODEL = "smol"

SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 15},
            "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
        },
        "required": ["city", "population"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 10},
                    "address": {
                        "type": "object",
                        "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "address"],
                "additionalProperties": False,
            }
        },
        "required": ["person"],
        "additionalProperties": False,
    },
    "array_enum": {
        "type": "object",
        "properties": {
            "colors": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "minItems": 1,
                "maxItems": 3,
            },
            "mood": {"type": "string", "enum": ["happy", "sad"]},
        },
        "required": ["colors", "mood"],
        "additionalProperties": False,
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["age", "score"],
        "additionalProperties": False,
    },
    "optional_fields": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 12},
            "done": {"type": "boolean"},
            "note": {"type": "string", "maxLength": 8},
        },
        "required": ["title"],
        "additionalProperties": False,
    },
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 15},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Adds two integers",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                "b": {"type": "integer", "minimum": -1000, "maximum": 1000},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def smol_server(smollm2_folder):
    port = free_port()
    env = {
        "JAXSERVE_MODEL": str(smollm2_folder),
        "JAXSERVE_DTYPE": "float32",
        "JAXSERVE_MAX_MODEL_LEN": "1024",
        "JAXSERVE_NUM_KV_PAGES": "256",
        "JAXSERVE_SERVED_MODEL_NAME": MODEL,
        "JAXSERVE_API_KEY": API_KEY,
        "JAXSERVE_ENABLE_AUTO_TOOL_CHOICE": "1",
        "JAXSERVE_TOOL_CALL_PARSER": "hermes",
    }
    proc = ServerProcess(
        ["-m", "uvicorn", "jaxserve.app:app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env,
        port,
    )
    try:
        yield proc.wait_ready(timeout=600)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(smol_server):
    with openai.OpenAI(base_url=f"{smol_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def http(smol_server):
    with httpx.Client(base_url=smol_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300) as c:
        yield c


def _ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_json_schemas_always_validate(client):
    def one(item):
        name, schema = item
        r = client.chat.completions.create(
            model=MODEL,
            messages=_ask(f"Give me an example {name.replace('_', ' ')} object as JSON."),
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
            temperature=0.8,
            seed=7,
            max_tokens=80,
        )
        return name, r.choices[0]

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        results = list(pool.map(one, SCHEMAS.items()))
    for name, choice in results:
        assert choice.finish_reason == "stop", (name, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


def test_json_object_regex_and_choice_on_both_endpoints(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=_ask("Reply with a JSON object with one key."),
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=40,
    )
    content = r.choices[0].message.content
    assert content.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    r = client.chat.completions.create(
        model=MODEL,
        messages=_ask("A phone number?"),
        extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}},
        max_tokens=20,
    )
    assert re.fullmatch(r"\d{3}-\d{4}", r.choices[0].message.content)
    r = client.completions.create(
        model=MODEL, prompt="Is the sky blue? Answer:", extra_body={"guided_choice": ["yes", "no"]}, max_tokens=5, n=2
    )
    assert {c.text for c in r.choices} <= {"yes", "no"}
    r = client.completions.create(
        model=MODEL, prompt="The year:", extra_body={"guided_regex": "(19|20)[0-9]{2}"}, max_tokens=8
    )
    assert re.fullmatch("(19|20)[0-9]{2}", r.choices[0].text)
    r = client.completions.create(
        model=MODEL,
        prompt="A city as JSON:",
        extra_body={"structured_outputs": {"json": SCHEMAS["flat"]}},
        max_tokens=60,
        temperature=0,
    )
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["flat"])
    r = client.chat.completions.create(
        model=MODEL,
        messages=_ask("Pick."),
        extra_body={"guided_grammar": 'start: "alpha" | "beta"'},
        max_tokens=5,
    )
    assert r.choices[0].message.content in ("alpha", "beta")


def test_streaming_and_whole_replies_agree(client):
    kwargs = dict(
        model=MODEL,
        messages=_ask("A person as JSON."),
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS["nested"]}},
        temperature=0,
        max_tokens=60,
    )
    whole = client.chat.completions.create(**kwargs).choices[0]
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == whole.message.content and finish == whole.finish_reason == "stop"


@pytest.mark.parametrize(
    "body, problem",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
            "nope",
        ),
        ({"structured_outputs": {"regex": "[a-"}}, "regex"),
        ({"guided_json": "{broken"}, "JSON"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "not both"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
    ],
)
def test_bad_requests_get_400_and_the_server_serves_on(http, body, problem):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert problem in err["message"] and err["type"] == "invalid_request_error"
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_no_field_is_silently_ignored(http, smol_server):
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    r = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]},
    )
    assert r.status_code == 400 and "text only" in r.json()["error"]["message"]
    r = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": _ask("hi"), "max_tokens": 2, "some_future_field": 1, "best_of": 1},
    )
    assert r.status_code == 200  # unknown fields are ignored (and logged once); best_of == n is served
    http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1, "some_future_field": 2})
    assert smol_server.output().count("'some_future_field'") == 1
    assert http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    r = http.get("/v1/models/unknown-model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def _check_calls(choice):
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and re.fullmatch("call_[0-9a-f]{24}", call.id)
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_required_and_named_tool_choice_always_call(client):
    prompts = ["What is the weather in Paris?", "Add 2 and 3.", "Hello!"]
    for text in prompts:
        r = client.chat.completions.create(
            model=MODEL, messages=_ask(text), tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0
        )
        _check_calls(r.choices[0])
        r = client.chat.completions.create(
            model=MODEL,
            messages=_ask(text),
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "add"}},
            max_tokens=40,
            temperature=0,
        )
        _check_calls(r.choices[0])
        assert [c.function.name for c in r.choices[0].message.tool_calls] == ["add"]


def test_streamed_tool_calls_match_the_whole_reply(client):
    kwargs = dict(
        model=MODEL,
        messages=_ask("Weather in Rome?"),
        tools=TOOLS,
        tool_choice="required",
        max_tokens=80,
        temperature=0,
    )
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls, finish = {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]


def test_tool_none_and_auto_and_a_tool_history(client):
    r = client.chat.completions.create(
        model=MODEL, messages=_ask("Hi"), tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0
    )
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason in ("stop", "length")
    r = client.chat.completions.create(model=MODEL, messages=_ask("Hi"), tools=TOOLS, max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    history = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 3}'},
    ]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=8, temperature=0)
    assert r.choices[0].message.content is not None or r.choices[0].message.tool_calls


def test_langchain_structured_output_and_bind_tools(smol_server):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(
        model=MODEL, base_url=f"{smol_server.url}/v1", api_key=API_KEY, temperature=0, max_tokens=80, max_retries=0
    )
    structured = llm.with_structured_output(
        {"title": "City", "description": "A city", **SCHEMAS["flat"]}, method="json_schema"
    )
    result = structured.invoke("Name a city and its population.")
    jsonschema.validate(result, SCHEMAS["flat"])
    message = llm.bind_tools(TOOLS, tool_choice="required").invoke("What is the weather in Lima?")
    assert message.tool_calls
    for call in message.tool_calls:
        jsonschema.validate(call["args"], PARAMS[call["name"]])
