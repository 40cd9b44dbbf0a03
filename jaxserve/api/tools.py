"""Tool calling for /v1/chat/completions: what `tools` and `tool_choice` do to the prompt, the
grammar and the reply.

    tool_choice  prompt                grammar (engine)                        reply -> tool_calls
    "none"       no tools offered      none                                    text only
    "auto"       tools offered         none                                    --tool-call-parser parses the text
    "required"   tools offered         a JSON array of 1+ calls {name,         each element
                                       arguments} whose arguments follow the
                                       tool's parameter schema
    {function}   tools offered         that tool's parameter schema            the whole text is the arguments

"auto" (the default when tools are given) needs a parser (`--enable-auto-tool-choice
--tool-call-parser NAME`): without one it is a 400, as in vLLM. A chat template that does not know
`tools` (SmolLM2's) gets them described in a system message, in the hermes format, and earlier
assistant tool calls written back as <tool_call> blocks.
"""

from __future__ import annotations

import dataclasses
import json
import uuid

from jaxserve.api.errors import bad_request
from jaxserve.api.tool_parsers import ParsedCall, ToolParser, get_parser
from jaxserve.sampling_params import StructuredOutputsParams

ANY_OBJECT = {"type": "object"}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclasses.dataclass
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict]  # OpenAI's tool objects, as sent
    named: str | None = None
    parser: ToolParser | None = None
    parallel: bool = True

    @property
    def offered(self) -> list[dict] | None:
        """The tools the chat template gets (None: none)."""
        return self.tools if self.mode != "none" else None

    @property
    def parses_calls(self) -> bool:
        return self.mode in ("auto", "required", "named")

    def grammar(self) -> StructuredOutputsParams | None:
        if self.mode == "named":
            (tool,) = [t for t in self.tools if t["function"]["name"] == self.named]
            return StructuredOutputsParams(json=tool["function"].get("parameters") or ANY_OBJECT)
        if self.mode == "required":
            one_of = [
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": t["function"]["name"]},
                        "arguments": t["function"].get("parameters") or ANY_OBJECT,
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for t in self.tools
            ]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutputsParams(json=schema)
        return None

    def content_end(self, text: str) -> int:
        """How much of a growing reply a stream may send as content now."""
        if self.mode in ("required", "named"):
            return 0  # the whole reply is the call
        if self.mode == "auto":
            return self.parser.content_end(text)
        return len(text)

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """The finished reply -> (content, calls). A reply that is not a valid call (cut short by
        max_tokens) stays content."""
        if self.mode == "named":
            try:
                args = json.loads(text)
            except json.JSONDecodeError:
                return text, []
            return None, [ParsedCall(self.named, json.dumps(args, ensure_ascii=False))]
        if self.mode == "required":
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                return text, []
            return None, [ParsedCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in items]
        if self.mode == "auto":
            content, calls = self.parser.extract(text)
            return content, calls if self.parallel else calls[:1]  # parallel_tool_calls: false keeps one
        return text, []


def tool_plan(req, parser_name: str | None) -> ToolPlan | None:
    """The request's tool plan (None without tools); 400 for a choice that cannot be served."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise bad_request("`tool_choice` needs `tools`", param="tool_choice")
        return None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    names = [t["function"]["name"] for t in tools]
    if choice is None:
        choice = "auto"
    if not isinstance(choice, str):
        if choice.function.name not in names:
            raise bad_request(
                f"tool_choice names {choice.function.name!r}, which is not among the tools ({', '.join(names)})",
                param="tool_choice",
            )
        return ToolPlan("named", tools, named=choice.function.name)
    if choice == "auto":
        if parser_name is None:
            raise bad_request(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                param="tool_choice",
            )
        return ToolPlan("auto", tools, parser=get_parser(parser_name), parallel=req.parallel_tool_calls)
    return ToolPlan(choice, tools, parallel=req.parallel_tool_calls)


def hermes_tools_prompt(tools: list[dict]) -> str:
    """Tools described for a model whose chat template does not take them (hermes' format)."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "You may call one or more functions to assist with the user query. The functions are listed "
        f"within <tools></tools>:\n<tools>\n{listed}\n</tools>\n"
        "For each function call, return a JSON object with the function name and arguments within "
        '<tool_call></tool_call> tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call>"
    )


def with_tools_in_text(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """For a template that knows neither `tools` nor `tool_calls`: the tools in the system message,
    assistant calls as <tool_call> blocks in their content."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and calls:
            blocks = [
                "<tool_call>\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))},
                    ensure_ascii=False,
                )
                + "\n</tool_call>"
                for c in calls
            ]
            m = {**m, "content": "\n".join([m.get("content") or "", *blocks]).strip()}
        out.append(m)
    if tools:
        text = hermes_tools_prompt(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}"}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _arguments(args):
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args
