"""Tool-call parsers for tool_choice "auto": the model's text -> (content, calls).

    text --parser.extract--> content outside the calls (None if empty), [ParsedCall(name, arguments JSON)]
    text --parser.content_end--> how much of a text still being generated is surely content (a
         stream sends that and holds the rest back until the end, when extract decides)

Chosen by `--tool-call-parser` (vLLM's names): hermes (<tool_call>{...}</tool_call>, Qwen2.5,
Hermes, SmolLM2's own tool prompt), llama3_json (a JSON object {"name", "parameters"} as the whole
reply, calls joined by ";"), mistral ([TOOL_CALLS][{...}, ...]). A call whose JSON does not parse
stays content: nothing the model wrote is dropped.
"""

from __future__ import annotations

from jaxserve.api.tool_parsers.base import ParsedCall, ToolParser
from jaxserve.api.tool_parsers.hermes import HermesParser
from jaxserve.api.tool_parsers.llama3_json import Llama3JsonParser
from jaxserve.api.tool_parsers.mistral import MistralParser

PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
}

__all__ = ["PARSERS", "ParsedCall", "ToolParser", "get_parser"]


def get_parser(name: str) -> ToolParser:
    if name not in PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of {', '.join(PARSERS)}")
    return PARSERS[name]()
