"""Tool-call parsers and tool plans, without a server."""

from __future__ import annotations

import json

import pytest

from jaxserve.api.errors import APIError
from jaxserve.api.protocol import ChatCompletionRequest
from jaxserve.api.tool_parsers import get_parser
from jaxserve.api.tools import tool_plan, with_tools_in_text

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_hermes_turns_tool_call_blocks_into_calls():
    text = (
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    )
    content, calls = get_parser("hermes").extract(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("add", {"a": 1, "b": 2}),
    ]


def test_hermes_keeps_text_without_a_valid_call():
    parser = get_parser("hermes")
    assert parser.extract("Just text.") == ("Just text.", [])
    content, calls = parser.extract("<tool_call>{not json</tool_call>")
    assert calls == [] and content == "<tool_call>{not json</tool_call>"


def test_hermes_streams_content_up_to_a_possible_call():
    parser = get_parser("hermes")
    assert parser.content_end("Hello <tool") == len("Hello ")
    assert parser.content_end("Hello <tool_call>{") == len("Hello ")
    assert parser.content_end("Hello world") == len("Hello world")


def test_llama3_json_and_mistral():
    content, calls = get_parser("llama3_json").extract(
        '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    )
    assert content is None and [c.name for c in calls] == ["a", "b"] and json.loads(calls[0].arguments) == {"x": 1}
    assert get_parser("llama3_json").extract("No call here {x}") == ("No call here {x}", [])
    assert get_parser("llama3_json").content_end('{"name"') == 0
    content, calls = get_parser("mistral").extract('Sure. [TOOL_CALLS][{"name": "f", "arguments": {"q": "z"}}]')
    assert content == "Sure." and calls[0].name == "f" and json.loads(calls[0].arguments) == {"q": "z"}


def _request(**kw):
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **kw)


def test_tool_plans():
    assert tool_plan(_request(), None) is None
    with pytest.raises(APIError, match="enable-auto-tool-choice"):
        tool_plan(_request(tools=[TOOL]), None)  # "auto" by default, no parser configured
    with pytest.raises(APIError, match="not among the tools"):
        tool_plan(_request(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}), None)
    with pytest.raises(APIError, match="needs `tools`"):
        tool_plan(_request(tool_choice="required"), None)
    plan = tool_plan(_request(tools=[TOOL], tool_choice="required", parallel_tool_calls=False), None)
    schema = plan.grammar().json
    assert schema["minItems"] == schema["maxItems"] == 1
    assert plan.extract('[{"name": "get_weather", "arguments": {"city": "X"}}]')[1][0].name == "get_weather"
    assert tool_plan(_request(tools=[TOOL], tool_choice="none"), None).offered is None
    two = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'
    assert len(tool_plan(_request(tools=[TOOL]), "hermes").extract(two)[1]) == 2
    assert len(tool_plan(_request(tools=[TOOL], parallel_tool_calls=False), "hermes").extract(two)[1]) == 1


def test_tools_and_calls_written_for_a_template_without_them():
    messages = [
        {"role": "user", "content": "w?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "content": "3"},
    ]
    out = with_tools_in_text(messages, [TOOL])
    assert out[0]["role"] == "system" and "<tools>" in out[0]["content"] and "get_weather" in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'


def _outputs(text: str, step: int):
    """Cumulative RequestOutputs of text growing `step` characters at a time, the last finished."""
    from jaxserve.outputs import CompletionOutput, RequestOutput

    cuts = list(range(step, len(text), step)) + [len(text)]
    for k, end in enumerate(cuts):
        done = k == len(cuts) - 1
        c = CompletionOutput(0, text[:end], list(range(end)), None, None, "stop" if done else None)
        yield RequestOutput("r", None, [1], None, [c], done)


def test_auto_stream_and_whole_reply_agree_on_a_hermes_call():
    from jaxserve.api.responses import ChatBuilder

    text = 'Sure, checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    plan = tool_plan(_request(tools=[TOOL]), "hermes")
    final = list(_outputs(text, 5))[-1]
    whole = ChatBuilder("id", "m", 1, tools=plan).response(final).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Sure, checking."
    assert whole.message.tool_calls[0].function.name == "get_weather"
    builder = ChatBuilder("id", "m", 1, tools=plan)
    content, calls, finish = "", [], None
    for out in _outputs(text, 5):
        for chunk in builder.chunks(out):
            d = chunk.model_dump()["choices"][0]
            assert "<tool" not in (d["delta"].get("content") or "")
            content += d["delta"].get("content") or ""
            calls += d["delta"].get("tool_calls") or []
            finish = d["finish_reason"] or finish
    assert content.strip() == whole.message.content and finish == "tool_calls"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function" and calls[0]["index"] == 0


def test_a_template_that_takes_tools_gets_them_and_the_history_as_is():
    from jaxserve.api.protocol import ChatMessage
    from jaxserve.api.translate import chat_prompt

    class Tokenizer:  # Qwen2.5-like: its template reads `tools` and `tool_calls` itself
        chat_template = "{% if tools %}...{% endif %}{% for m in messages %}{{ m.tool_calls }}{% endfor %}"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize, **kw):
            self.seen = (messages, kw)
            return "text"

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [1, 2]}

    tok = Tokenizer()
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        ChatMessage(role="user", content="w?"),
        ChatMessage(role="assistant", content=None, tool_calls=[call]),
        ChatMessage(role="tool", content="3", tool_call_id="c"),
    ]
    assert chat_prompt(tok, messages, tools=[TOOL])["prompt_token_ids"] == [1, 2]
    seen, kw = tok.seen
    assert kw == {"tools": [TOOL]} and seen[1]["tool_calls"] == [call] and seen[2]["tool_call_id"] == "c"
