"""`uvicorn jaxserve.app:app`: the OpenAI-compatible server, configured by the environment.

This module is an entry point, and the only place below `jaxserve serve` that reads os.environ:

    JAXSERVE_<ENGINECONFIG FIELD>   any EngineConfig field, upper-cased: JAXSERVE_MODEL,
                                    JAXSERVE_TENSOR_PARALLEL_SIZE, JAXSERVE_MAX_MODEL_LEN,
                                    JAXSERVE_MAX_NUM_SEQS, JAXSERVE_MAX_NUM_BATCHED_TOKENS,
                                    JAXSERVE_GPU_MEMORY_UTILIZATION, JAXSERVE_LOAD_FORMAT,
                                    JAXSERVE_DTYPE, JAXSERVE_MAX_WAITING_REQUESTS, JAXSERVE_CACHE_DIR ...
    JAXSERVE_SERVED_MODEL_NAME      comma-separated names the API answers to
    JAXSERVE_API_KEY                required as "Authorization: Bearer <key>" on every route but
                                    /health and /metrics
    JAXSERVE_MAX_REQUEST_BODY_BYTES larger request bodies get 413 (default 16 MiB)
    JAXSERVE_ENABLE_AUTO_TOOL_CHOICE 1: tool_choice "auto" parses tool calls (needs the parser)
    JAXSERVE_TOOL_CALL_PARSER       hermes | llama3_json | mistral
    JAXSERVE_FAULT_TOKEN_ID         test-only: steps scheduling a prompt with this token fail
    JAXSERVE_ENGINE_IN_PROCESS      1: the engine core on a thread of the server's process (debugging);
                                    0: in a process of its own

The engine is built in the app's lifespan, so importing this module is cheap.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from jaxserve.config import EngineConfig
from jaxserve.engine.core_client import leave_the_device_to_the_engine
from jaxserve.engine_args import PLAN_FIELDS, default_plan, describe_plan, field_type, with_plan
from jaxserve.server import ServerSettings, create_app

PREFIX = "JAXSERVE_"
# transformers advises at import that PyTorch is absent; jaxserve never needs it.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def settings_from_env(environ: Mapping[str, str] = os.environ) -> ServerSettings:
    flag = environ.get(PREFIX + "ENGINE_IN_PROCESS")
    in_process = ServerSettings.engine_in_process if flag in (None, "") else flag.lower() in ("1", "true", "yes")
    if not in_process:
        leave_the_device_to_the_engine()  # before the plan below initialises JAX here
    engine_args = {}
    for field in dataclasses.fields(EngineConfig):
        value = environ.get(PREFIX + field.name.upper())
        if value not in (None, ""):
            kind = field_type(field)
            try:
                engine_args[field.name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
            except ValueError:
                raise ValueError(f"{PREFIX}{field.name.upper()}={value!r}: expected {kind.__name__}") from None
    if not any(name in engine_args for name in PLAN_FIELDS):  # the device decides the default plan
        import jax

        plan = default_plan(jax.default_backend())
        engine_args, planned = with_plan(engine_args, plan)
        if planned:
            print(describe_plan(plan, "env"))
    names = tuple(n.strip() for n in environ.get(PREFIX + "SERVED_MODEL_NAME", "").split(",") if n.strip())
    fault = environ.get(PREFIX + "FAULT_TOKEN_ID")
    body_limit = environ.get(PREFIX + "MAX_REQUEST_BODY_BYTES")
    extra = {}
    if body_limit:
        try:
            extra["max_request_body_bytes"] = int(body_limit)
        except ValueError:
            raise ValueError(f"{PREFIX}MAX_REQUEST_BODY_BYTES={body_limit!r}: expected an integer") from None
    return ServerSettings(
        engine=EngineConfig(**engine_args),
        served_model_names=names,
        api_key=environ.get(PREFIX + "API_KEY") or None,
        fault_token_id=int(fault) if fault else None,
        enable_auto_tool_choice=environ.get(PREFIX + "ENABLE_AUTO_TOOL_CHOICE", "").lower() in ("1", "true", "yes"),
        tool_call_parser=environ.get(PREFIX + "TOOL_CALL_PARSER") or None,
        engine_in_process=in_process,
        **extra,
    )


app = create_app(settings_from_env())
