"""The typed messages between the API server and the engine core (msgspec structs; msgpack on the
wire when the core runs in a process of its own, the same objects handed over when it runs on a thread).

    API server -> engine core (EngineInput)          engine core -> API server (EngineMessage)
      AddRequest(id, prompt token ids, params)         Ready(what the API needs: tokenizer folder,
      Abort(id)                                              vocab, context length, KV plan)
      FinishStopped(sample id, stop string)            StartupFailed(error)
      ResetPrefixCache(call id)                        Steps(step outputs, engine stats): one per
      Shutdown()                                             loop turn that produced or changed any
                                                       Failed(request ids, error): those requests only
                                                       Reply(call id, value)

SamplingParams travel as plain data (its dataclass fields, validated again on arrival): anything
compiled from them (a grammar) is built on the engine's side. Timestamps inside step outputs are
time.perf_counter() readings, which on Linux is CLOCK_MONOTONIC: one clock for every process.
"""

from __future__ import annotations

import msgspec
import numpy as np

from jaxserve.engine.core import EngineCoreOutput
from jaxserve.engine.runner import TokenLogprobs
from jaxserve.sampling_params import SamplingParams


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class Abort(msgspec.Struct, tag=True, array_like=True):
    request_id: str


class FinishStopped(msgspec.Struct, tag=True, array_like=True):
    """The output processor found a stop string in this sample's text."""

    sample_id: str
    stop: str


class ResetPrefixCache(msgspec.Struct, tag=True, array_like=True):
    call_id: int


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


EngineInput = AddRequest | Abort | FinishStopped | ResetPrefixCache | Shutdown


class EngineStats(msgspec.Struct, array_like=True, frozen=True):
    """What /metrics reads of the engine's state, as of the end of a loop turn."""

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class Ready(msgspec.Struct, tag=True, array_like=True):
    tokenizer_folder: str | None  # None: the engine serves token ids only
    vocab_size: int
    max_model_len: int
    processor_names: list[str]
    cache_config: dict[str, str]
    clock: str  # time.get_clock_info("perf_counter").implementation in the engine process
    pid: int


class StartupFailed(msgspec.Struct, tag=True, array_like=True):
    error: str


class Steps(msgspec.Struct, tag=True, array_like=True):
    outputs: list[EngineCoreOutput]
    stats: EngineStats


class Failed(msgspec.Struct, tag=True, array_like=True):
    """These requests failed (the engine serves on); error_type names the exception's class."""

    request_ids: list[str]
    error_type: str
    error: str


class Reply(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    value: int


EngineMessage = Ready | StartupFailed | Steps | Failed | Reply


def _enc_hook(obj):
    if isinstance(obj, np.ndarray):  # TokenLogprobs' top ids and logprobs
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _dec_hook(kind, obj):
    if kind is np.ndarray:
        return np.asarray(obj)
    raise NotImplementedError(f"cannot decode {kind}")


class EngineError(RuntimeError):
    """An exception raised in the engine process, re-raised in the API process under its own name
    (so that a 500 reads the same whichever process the engine runs in)."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type

    def __str__(self) -> str:
        return super().__str__()


def remote_error(failed: Failed) -> Exception:
    """The exception a Failed message stands for: ValueError stays a ValueError (a 400); anything
    else keeps its class name."""
    if failed.error_type == "ValueError":
        return ValueError(failed.error)
    return type(failed.error_type, (EngineError,), {})(failed.error_type, failed.error)


encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
input_decoder = msgspec.msgpack.Decoder(EngineInput)
message_decoder = msgspec.msgpack.Decoder(EngineMessage, dec_hook=_dec_hook)

__all__ = [
    "Abort",
    "AddRequest",
    "EngineError",
    "EngineInput",
    "EngineMessage",
    "EngineStats",
    "Failed",
    "FinishStopped",
    "Ready",
    "Reply",
    "ResetPrefixCache",
    "Shutdown",
    "StartupFailed",
    "Steps",
    "TokenLogprobs",
    "encoder",
    "input_decoder",
    "message_decoder",
    "remote_error",
]
