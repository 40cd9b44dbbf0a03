"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

from __future__ import annotations

import re

from pydantic import ValidationError


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        message, param = _encodable(message), _encodable(param)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _encodable(text: str | None) -> str | None:
    """Text that UTF-8 can always encode: an error may echo input (a model name) that holds lone
    surrogates; they become backslash escapes (\\ud800) instead of failing the response."""
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


_NAMED = re.compile(r"^([a-z_]+) must be")  # SamplingParams names the field it refuses first


def from_value_error(e: ValueError) -> APIError:
    """A ValueError from SamplingParams or the engine's validation (context length included) -> 400."""
    message = str(e)
    named = _NAMED.match(message)
    return bad_request(message, param=named.group(1) if named else None)


def from_validation_error(e: ValidationError) -> APIError:
    """pydantic's first complaint, with the field's dotted path as param."""
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")  # our own validators' messages read better bare
    return bad_request(f"{loc}: {msg}" if loc else msg, param=loc or None)


def model_not_found(name: str) -> APIError:
    return APIError(
        404, f"The model `{name}` does not exist.", type="NotFoundError", param="model", code="model_not_found"
    )


def unauthorized() -> APIError:
    return APIError(
        401,
        "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
        type="authentication_error",
        code="invalid_api_key",
    )


def overloaded(retry_after_s: int) -> APIError:
    return APIError(
        503,
        "The server is at capacity (the waiting queue is full); retry later.",
        type="server_overloaded",
        code="queue_full",
        headers={"Retry-After": str(retry_after_s)},
    )


def client_disconnected() -> APIError:
    """The client left before its body was complete: nobody reads this answer, and nothing is logged."""
    return APIError(400, "the client disconnected before sending the whole request body", code="client_disconnected")


def internal(e: BaseException) -> APIError:
    return APIError(
        500, f"The engine failed on this request: {type(e).__name__}: {e}", type="server_error", code="engine_error"
    )
