"""The engine core in a process of its own: `python -m jaxserve.engine.core_process SPEC`, started by
the API server (core_client.py), which it serves until told to shut down or until that server is gone.

    start:  SPEC (JSON: EngineConfig, socket addresses, the API server's pid) -> die with the API
            server (PR_SET_PDEATHSIG) -> connect the two sockets -> LLMEngine (model, KV plan,
            warm-up) -> Ready (or StartupFailed, then exit 1)
    serve:  inputs PULL: AddRequest / Abort / FinishStopped / ResetPrefixCache / Shutdown, drained
            before every step (an abort lands within one step) -> CoreLoop.turn (one step)
            -> outputs PUSH: one Steps message per step (token ids, logprobs, finishes, stats),
            Failed, Reply
    several processes (spec.distributed, multihost.py): jax.distributed joined before the engine is
            built; each turn's inputs are broadcast to the followers before they are applied, and
            the API server gone is a Shutdown broadcast like any other input
    stop:   Shutdown (the API server drained its requests first) -> exit 0. SIGTERM and SIGINT are
            ignored: a supervisor signalling the whole process group must not cut the requests the
            API server is still draining. The API server gone (killed) -> the kernel kills this
            process (or, where prctl is missing, the next poll notices) and the device is free.

Detokenizing, stop strings and HTTP stay in the API server: this process steps, and sends ids.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import sys
import time
import traceback

import msgspec
import zmq

from jaxserve.config import DistributedConfig, EngineConfig
from jaxserve.engine.core_loop import CoreLoop, engine_stats
from jaxserve.engine.messages import Failed, Ready, Reply, Shutdown, StartupFailed, Steps, encoder, input_decoder

IDLE_POLL_MS = 500  # how often an idle engine looks whether the API server is still there


class ProcessSpec(msgspec.Struct):
    engine: dict  # EngineConfig's fields (a path as a string)
    input_address: str  # the API server's PUSH socket (requests in)
    output_address: str  # the API server's PULL socket (step outputs out)
    parent_pid: int
    fault_token_id: int | None = None
    distributed: dict | None = None  # DistributedConfig's fields: this is process 0 of several


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the API server dies, however it dies (Linux); elsewhere the
    serving loop's poll notices."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)


class SocketSink:
    """CoreLoop's results as messages on the output socket."""

    def __init__(self, socket: zmq.Socket, loop: CoreLoop | None = None):
        self.socket, self.loop = socket, loop
        self.sent_stats = None

    def steps(self, outputs) -> None:
        self.send_steps(outputs)

    def send_steps(self, outputs) -> None:
        stats = engine_stats(self.loop.core)
        self.socket.send(encoder.encode(Steps(outputs, stats)), copy=False)
        self.sent_stats = stats

    def failed(self, request_ids, error: BaseException) -> None:
        self.socket.send(encoder.encode(Failed(list(request_ids), type(error).__name__, str(error))))

    def reply(self, call_id: int, value: int) -> None:
        self.socket.send(encoder.encode(Reply(call_id, int(value))))


def serve(core, inputs: zmq.Socket, outputs: zmq.Socket, parent_pid: int, broadcast=None) -> None:
    """broadcast: a multihost.InputBroadcast (several processes): each turn's inputs go to the
    followers first, and every process applies them in the same order."""
    sink = SocketSink(outputs)
    loop = CoreLoop(core, sink)
    sink.loop = loop
    while not loop.shutdown_requested:
        timeout = 0 if core.has_work() else IDLE_POLL_MS
        received = []
        while inputs.poll(timeout):  # everything that came, before the next step
            received.append(input_decoder.decode(inputs.recv(copy=False).buffer))
            timeout = 0
        if os.getppid() != parent_pid:  # the API server is gone
            received.append(Shutdown())
        if broadcast is not None:
            received = broadcast.exchange(received)
        for message in received:
            loop.apply(message)
        if loop.shutdown_requested:
            return
        loop.turn()
        if sink.sent_stats != engine_stats(core):  # e.g. an abort freed pages: /metrics must see it
            sink.send_steps([])


def main(argv: list[str]) -> int:
    spec = msgspec.json.decode(argv[1], type=ProcessSpec)
    die_with_parent(spec.parent_pid)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    context = zmq.Context()
    inputs = context.socket(zmq.PULL)
    inputs.connect(spec.input_address)
    outputs = context.socket(zmq.PUSH)
    outputs.setsockopt(zmq.SNDHWM, 0)  # never drop or block on outputs: the API server reads them all
    outputs.connect(spec.output_address)

    def log(*args) -> None:
        print(*args, flush=True)

    broadcast = None
    try:
        from jaxserve.engine.faults import inject_step_failure
        from jaxserve.engine.llm_engine import LLMEngine

        config = EngineConfig(**spec.engine)
        if spec.distributed is not None:
            from jaxserve.engine import multihost

            dist = DistributedConfig(**spec.distributed)
            log(f"engine core: joining {dist.num_processes} processes through {dist.coordinator_address}")
            multihost.initialize(dist)
            seed = multihost.agree(config, config.seed if config.seed is not None else secrets.randbits(64))
            broadcast = multihost.InputBroadcast(is_leader=True)
        engine = LLMEngine(config, log=log)
        if broadcast is not None:
            engine.core.reseed(seed)
        if spec.fault_token_id is not None:
            inject_step_failure(engine, spec.fault_token_id)
    except Exception as e:
        traceback.print_exc()
        outputs.send(encoder.encode(StartupFailed(f"{type(e).__name__}: {e}")))
        outputs.close(linger=5000)
        return 1
    tokenizer = engine.tokenizer
    ready = Ready(
        tokenizer_folder=None if tokenizer is None else str(tokenizer.name_or_path),
        vocab_size=engine.vocab_size,
        max_model_len=engine.max_model_len,
        processor_names=list(engine.inputs.processor_names),
        cache_config=engine.cache_config,
        clock=time.get_clock_info("perf_counter").implementation,
        pid=os.getpid(),
    )
    outputs.send(encoder.encode(ready))
    serve(engine.core, inputs, outputs, spec.parent_pid, broadcast)
    outputs.close(linger=2000)
    inputs.close(linger=0)
    context.term()
    if broadcast is not None:
        import jax

        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
