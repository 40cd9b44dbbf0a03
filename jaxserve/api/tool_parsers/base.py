"""What every tool-call parser offers, and helpers they share."""

from __future__ import annotations

import json
from typing import NamedTuple


class ParsedCall(NamedTuple):
    name: str
    arguments: str  # JSON text of an object


class ToolParser:
    marker: str = ""  # the text that opens a call

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        raise NotImplementedError

    def content_end(self, text: str) -> int:
        """Characters of text (still growing) that are content whatever comes next: up to the
        marker, less a tail that may be the marker's beginning."""
        at = text.find(self.marker)
        if at >= 0:
            return at
        for keep in range(min(len(self.marker) - 1, len(text)), 0, -1):
            if self.marker.startswith(text[-keep:]):
                return len(text) - keep
        return len(text)


def call_from_json(obj, arguments_key: str = "arguments") -> ParsedCall | None:
    """{"name": str, "arguments"|"parameters": object} -> a call (None if it is not one)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(arguments_key, obj.get("parameters", obj.get("arguments", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def content_or_none(text: str) -> str | None:
    text = text.strip()
    return text or None
