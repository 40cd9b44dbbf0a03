"""A request's grammar: OpenAI's response_format, vLLM's structured_outputs or its older guided_*
fields -> one StructuredOutputsParams (or None). Giving two of them is a 400 naming both; the
grammar itself is compiled (and a bad one refused) when the engine prepares the request."""

from __future__ import annotations

from jaxserve.api.errors import bad_request
from jaxserve.sampling_params import StructuredOutputsParams


def _from_response_format(rf) -> dict | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return {"json_object": True}
    schema = rf.json_schema.json_schema
    return {"json": schema} if schema is not None else {"json_object": True}


def _from_structured_outputs(so) -> dict | None:
    if so is None:
        return None
    given = {
        k: v
        for k, v in (
            ("json", so.json_spec),
            ("regex", so.regex),
            ("choice", so.choice),
            ("grammar", so.grammar),
            ("json_object", so.json_object),
        )
        if v is not None
    }
    return given or None


def _from_guided(req) -> dict | None:
    given = {
        kind: value
        for kind, value in (
            ("json", req.guided_json),
            ("regex", req.guided_regex),
            ("choice", req.guided_choice),
            ("grammar", req.guided_grammar),
        )
        if value is not None
    }
    return given or None


def structured_spec(req) -> StructuredOutputsParams | None:
    """The request's grammar, from whichever field gave it."""
    found = {
        name: spec
        for name, spec in (
            ("response_format", _from_response_format(req.response_format)),
            ("structured_outputs", _from_structured_outputs(req.structured_outputs)),
            ("guided_*", _from_guided(req)),
        )
        if spec is not None
    }
    if not found:
        return None
    if len(found) > 1:
        raise bad_request(f"give one of {' and '.join(found)}, not both", param=next(iter(found)))
    name, spec = next(iter(found.items()))
    try:
        return StructuredOutputsParams(**spec)
    except ValueError as e:
        raise bad_request(f"{name}: {e}", param=name.rstrip("_*")) from None
