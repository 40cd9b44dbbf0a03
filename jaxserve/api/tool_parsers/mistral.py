"""Mistral: content, then [TOOL_CALLS] and a JSON array of {"name": ..., "arguments": {...}}."""

from __future__ import annotations

import json

from jaxserve.api.tool_parsers.base import ParsedCall, ToolParser, call_from_json, content_or_none


class MistralParser(ToolParser):
    marker = "[TOOL_CALLS]"

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        at = text.find(self.marker)
        if at < 0:
            return content_or_none(text), []
        payload = text[at + len(self.marker) :].strip()
        try:
            obj, _ = json.JSONDecoder().raw_decode(payload)
        except json.JSONDecodeError:
            return content_or_none(text), []
        items = obj if isinstance(obj, list) else [obj]
        calls = [call_from_json(item) for item in items]
        if not calls or any(c is None for c in calls):
            return content_or_none(text), []
        return content_or_none(text[:at]), calls
