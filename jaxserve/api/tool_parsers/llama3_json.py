"""Llama 3.x JSON tool calls: the reply is {"name": ..., "parameters": {...}} (optionally after
<|python_tag|>), several calls joined by ";". Only a reply that starts with a call is one."""

from __future__ import annotations

import json

from jaxserve.api.tool_parsers.base import ParsedCall, ToolParser, call_from_json, content_or_none

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser(ToolParser):
    marker = "{"

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip().removeprefix(PYTHON_TAG).lstrip()
        if not body.startswith("{"):
            return content_or_none(text), []
        decoder, calls, i = json.JSONDecoder(), [], 0
        while i < len(body):
            try:
                obj, end = decoder.raw_decode(body, i)
            except json.JSONDecodeError:
                return content_or_none(text), []
            call = call_from_json(obj, "parameters")
            if call is None:
                return content_or_none(text), []
            calls.append(call)
            i = end
            while i < len(body) and body[i] in " \t\r\n;":
                i += 1
        return None, calls

    def content_end(self, text: str) -> int:
        body = text.lstrip()
        if not body or body.startswith("{") or PYTHON_TAG.startswith(body[: len(PYTHON_TAG)]):
            return 0  # may still become a call: hold it all
        return len(text)
