"""A request body -> a JSON object, strictly: what json.loads lets through that a request must not carry
is refused here with a 400 that names it, before pydantic or the tokenizer see it.

    bytes --UTF-8, strict--> text --json.loads with hooks--> object --walk--> dict
                              hooks: NaN / Infinity refused      walk: nested at most MAX_DEPTH deep,
                                     non-finite floats (1e400)         every string (keys too) valid
                                     integers over MAX_INT_DIGITS      Unicode: JSON's "\\ud800" escape
                                                                       decodes to a lone surrogate that
                                                                       no encoder or tokenizer accepts
"""

from __future__ import annotations

import json
import math

from jaxserve.api.errors import APIError, bad_request

MAX_DEPTH = 64  # OpenAI's bodies nest a handful deep (tools' JSON schemas a few more)
# Far past 64-bit ids and seeds; int() is quadratic in digits, and Python refuses past 4,300 of them.
MAX_INT_DIGITS = 32


class _Refused(ValueError):
    """Raised by a json.loads hook; its message is the 400's."""


def _refuse_constant(name: str):
    raise _Refused(f"{name} is not a JSON number: numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(text.lstrip('-'))} digits is too long (at most {MAX_INT_DIGITS})")
    return int(text)


def _check_string(s: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise bad_request(
                f"the request body holds a lone UTF-16 surrogate (\\u{ord(s[e.start]):04x}): "
                "strings must be valid Unicode"
            ) from None


def _check_nesting_and_strings(obj) -> None:
    """Walks the parsed body without recursion: depth and strings, keys included."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_string(value)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth > MAX_DEPTH:
            raise bad_request(f"the request body is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key in value:
                _check_string(key)
            value = value.values()
        stack.extend((v, depth + 1) for v in value)


def parse_json_object(body: bytes) -> dict:
    """The body as a JSON object, or an APIError (400) that says what is wrong with it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except (json.JSONDecodeError, _Refused) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # json's C scanner stops a few thousand levels deep
        raise bad_request(f"the request body is nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(obj, dict):
        raise bad_request("the request body must be a JSON object")
    _check_nesting_and_strings(obj)
    return obj


def body_too_large(limit: int) -> APIError:
    return APIError(
        413, f"the request body is larger than this server's limit of {limit} bytes", code="request_too_large"
    )
