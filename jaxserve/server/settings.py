"""ServerSettings: everything the entry points (jaxserve.app, `jaxserve serve`) decide."""

from __future__ import annotations

import dataclasses

from jaxserve.config import DistributedConfig, EngineConfig
from jaxserve.default_model import DEFAULT_MODEL_NAME

DEFAULT_MAX_WAITING_REQUESTS = 1024
# A 128k-token context several times over, even as JSON token ids or \uXXXX-escaped text.
DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    engine: EngineConfig = EngineConfig()
    served_model_names: tuple[str, ...] = ()  # empty: the model argument (or the default model's name)
    api_key: str | None = None  # when set, every route but /health and /metrics needs "Authorization: Bearer <key>"
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES  # larger bodies: 413
    retry_after_s: int = 1  # the Retry-After of a 503 when the waiting queue is full
    fault_token_id: int | None = None  # test-only: a step scheduling a prompt with this token fails
    # tool_choice "auto": parse tool calls out of the model's text with this parser (vLLM's flags)
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None  # hermes | llama3_json | mistral
    # The engine core on a thread of the server's process (debugging) rather than in a process of
    # its own (jaxserve/engine/core_process.py)
    engine_in_process: bool = False
    # Several processes (hosts) over one mesh: this server is process 0's (multihost.py)
    distributed: DistributedConfig = DistributedConfig()

    def __post_init__(self):
        if self.distributed.enabled and not self.distributed.is_leader:
            raise ValueError("only process 0 serves HTTP; the others run the engine alone (jaxserve serve does)")
        if self.distributed.enabled and self.engine_in_process:
            raise ValueError("--engine-in-process cannot join several processes: drop it, or --num-processes")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (hermes, llama3_json or mistral)")
        if self.tool_call_parser is not None:
            from jaxserve.api.tool_parsers import PARSERS

            if self.tool_call_parser not in PARSERS:
                raise ValueError(
                    f"unknown --tool-call-parser {self.tool_call_parser!r}; choose one of {', '.join(PARSERS)}"
                )

    @property
    def model_names(self) -> tuple[str, ...]:
        return self.served_model_names or (self.engine.model or DEFAULT_MODEL_NAME,)

    @property
    def max_waiting_requests(self) -> int:
        w = self.engine.max_waiting_requests
        return DEFAULT_MAX_WAITING_REQUESTS if w is None else w
