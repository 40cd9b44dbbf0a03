"""Hermes / Qwen2.5 style: each call is <tool_call>{"name": ..., "arguments": {...}}</tool_call>."""

from __future__ import annotations

import json
import re

from jaxserve.api.tool_parsers.base import ParsedCall, ToolParser, call_from_json, content_or_none

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class HermesParser(ToolParser):
    marker = "<tool_call>"

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        if self.marker not in text:
            return content_or_none(text), []
        calls, kept, last = [], [], 0
        for m in _CALL.finditer(text):
            try:
                call = call_from_json(json.loads(m.group(1)))
            except json.JSONDecodeError:
                call = None
            if call is None:  # not a call after all: it stays content
                continue
            kept.append(text[last : m.start()])
            last = m.end()
            calls.append(call)
        kept.append(text[last:])
        return content_or_none("".join(kept)), calls
