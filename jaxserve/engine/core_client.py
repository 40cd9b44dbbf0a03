"""The API server's side of an engine core in a process of its own (core_process.py).

    start():  bind two ZMQ sockets (ipc: Linux's abstract namespace, else a private folder) -> spawn `python -m
              jaxserve.engine.core_process` from this (the main) thread, config as JSON -> wait for
              Ready (or StartupFailed, or the process exiting: RuntimeError) -> RemoteEngine: the
              tokenizer (loaded here from the folder the engine names), input validation, and the
              engine stats the last step brought
    send():   on the event loop: AddRequest / Abort / FinishStopped / ResetPrefixCache, msgpack, PUSH
    receiver thread: PULL -> decode -> AsyncLLM.deliver_steps / deliver_failure / deliver_reply
              (decoding here, not on the event loop); between messages it watches the process:
              gone -> AsyncLLM.engine_died, once
    shutdown(): Shutdown -> wait for the process (then SIGKILL) -> close the sockets

The engine process dies with this one (PR_SET_PDEATHSIG, set by the child for the thread that
spawned it: the main thread, which lives as long as the server).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import msgspec
import zmq

from jaxserve.config import DistributedConfig, EngineConfig
from jaxserve.engine import gc_settings
from jaxserve.engine.core_process import ProcessSpec
from jaxserve.engine.input_processor import InputProcessor, PreparedRequest, Prompt
from jaxserve.engine.messages import (
    EngineInput,
    EngineStats,
    Failed,
    Ready,
    Reply,
    Shutdown,
    StartupFailed,
    Steps,
    encoder,
    message_decoder,
    remote_error,
)
from jaxserve.engine.structured_outputs import GrammarCompiler
from jaxserve.sampling_params import SamplingParams

RECEIVE_POLL_MS = 100  # how soon the receiver notices a dead engine process
SHUTDOWN_TIMEOUT_S = 30.0

# This process never runs a model: its JAX (imported, and initialised by the entry points to pick
# a plan) must not take the device memory the engine process needs.
API_PROCESS_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
_engine_env_overrides: dict[str, str | None] = {}


def leave_the_device_to_the_engine() -> None:
    """Called by the entry points before anything initialises JAX in the API process; the engine
    process gets the environment as it was."""
    for key, value in API_PROCESS_ENV.items():
        if key not in _engine_env_overrides:
            _engine_env_overrides[key] = os.environ.get(key)
            os.environ[key] = value


def _engine_environment() -> dict[str, str]:
    env = dict(os.environ)
    for key, value in _engine_env_overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class RemoteEngine:
    """The engine as the API process sees it: what LLMEngine offers the server (prepare, the
    tokenizer, the context length, the KV plan, the state /metrics reads), no device."""

    def __init__(self, ready: Ready, tokenizer, client: EngineCoreClient):
        self.tokenizer, self.client = tokenizer, client
        self.vocab_size, self.max_model_len = ready.vocab_size, ready.max_model_len
        self.cache_config = ready.cache_config
        self.inputs = InputProcessor(
            tokenizer,
            vocab_size=ready.vocab_size,
            max_model_len=ready.max_model_len,
            processor_names=ready.processor_names,
            # a bad grammar is a 400 here, before the request is sent; the engine compiles its own
            grammars=GrammarCompiler(tokenizer, ready.vocab_size) if tokenizer is not None else None,
        )

    def prepare(self, prompt: Prompt, params: SamplingParams | None = None) -> PreparedRequest:
        prepared = self.inputs.prepare(prompt, params)
        try:  # what cannot cross to the engine process is the request's fault (a 400), found here
            encoder.encode(prepared.params)
        except (OverflowError, msgspec.EncodeError) as e:
            raise ValueError(f"a sampling parameter is out of range: {e}") from None
        return prepared

    @property
    def stats(self) -> EngineStats:
        return self.client.stats

    @property
    def num_requests_running(self) -> int:
        return self.client.stats.num_requests_running

    @property
    def num_requests_waiting(self) -> int:
        return self.client.stats.num_requests_waiting

    @property
    def kv_cache_usage(self) -> float:
        return self.client.stats.kv_cache_usage

    @property
    def num_preemptions(self) -> int:
        return self.client.stats.num_preemptions

    @property
    def prefix_cache_queries(self) -> int:
        return self.client.stats.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.client.stats.prefix_cache_hits


def _socket_base() -> tuple[str | None, str]:
    """(folder to remove at shutdown or None, the sockets' base name). On Linux the sockets live in
    the abstract namespace ('@' names): nothing on disk, so a SIGKILLed server leaves nothing
    behind. Elsewhere, a private folder."""
    if sys.platform.startswith("linux"):
        return None, f"@jaxserve-engine-{os.getpid()}-{secrets.token_hex(8)}"
    folder = tempfile.mkdtemp(prefix="jaxserve-engine-")
    return folder, folder


class EngineCoreClient:
    def __init__(
        self,
        config: EngineConfig,
        *,
        fault_token_id: int | None = None,
        distributed: DistributedConfig = DistributedConfig(),
        log=print,
    ):
        """distributed: several processes (this is process 0's server): the engine process joins
        them and broadcasts the inputs it receives (multihost.py)."""
        self.config, self.fault_token_id, self.log = config, fault_token_id, log
        self.distributed = distributed
        self.stats = EngineStats()  # replaced (atomically) by each Steps message
        self.process: subprocess.Popen | None = None
        self._folder, base = _socket_base()
        self._context = zmq.Context()
        self._inputs = self._context.socket(zmq.PUSH)
        self._inputs.setsockopt(zmq.SNDHWM, 0)  # never drop a request or an abort
        self._outputs = self._context.socket(zmq.PULL)
        self._outputs.setsockopt(zmq.RCVHWM, 0)
        self.input_address = f"ipc://{base}/inputs"
        self.output_address = f"ipc://{base}/outputs"
        self._inputs.bind(self.input_address)
        self._outputs.bind(self.output_address)
        self._frontend = None
        self._receiver: threading.Thread | None = None
        self._closing = False

    # -- start-up -------------------------------------------------------------------------------
    async def start(self, timeout: float | None = None) -> RemoteEngine:
        """Spawns the engine process and waits until it is ready (model loaded, warmed up)."""
        gc_settings.thaw()
        config = dataclasses.asdict(self.config)
        if config["cache_dir"] is not None:
            config["cache_dir"] = str(config["cache_dir"])
        dist = dataclasses.asdict(self.distributed) if self.distributed.enabled else None
        spec = ProcessSpec(config, self.input_address, self.output_address, os.getpid(), self.fault_token_id, dist)
        # Spawned from this thread (the event loop's, the main one): the child's PDEATHSIG watches it.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jaxserve.engine.core_process", msgspec.json.encode(spec).decode()],
            env=_engine_environment(),
        )
        self.log(f"engine core: process {self.process.pid} started, loading and warming up")
        first = await asyncio.to_thread(self._wait_first_message, timeout)
        if isinstance(first, StartupFailed):
            await asyncio.to_thread(self._reap)
            raise RuntimeError(f"the engine process failed to start: {first.error}")
        clock = time.get_clock_info("perf_counter").implementation
        if first.clock != clock or "MONOTONIC" not in clock:
            self.log(
                f"warning: the engine's clock ({first.clock}) is not this process's ({clock}): queue times are off"
            )
        tokenizer = None
        if first.tokenizer_folder is not None:
            from jaxserve.tokenizer import load_tokenizer

            tokenizer = await asyncio.to_thread(load_tokenizer, first.tokenizer_folder)
        self.log(gc_settings.freeze_startup_heap())  # this process streams every token too
        return RemoteEngine(first, tokenizer, self)

    def _wait_first_message(self, timeout: float | None) -> Ready | StartupFailed:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._outputs.poll(RECEIVE_POLL_MS):
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"the engine process exited with status {code} while starting")
            if deadline is not None and time.monotonic() > deadline:
                self._kill()
                raise TimeoutError(f"the engine process was not ready in {timeout} s")
        message = message_decoder.decode(self._outputs.recv())
        if not isinstance(message, (Ready, StartupFailed)):
            raise RuntimeError(f"the engine process spoke before it was ready: {type(message).__name__}")
        return message

    # -- EngineCoreHandle (AsyncLLM's view) -----------------------------------------------------
    def attach(self, frontend) -> None:
        self._frontend = frontend
        self._receiver = threading.Thread(target=self._receive, name="jaxserve-engine-outputs", daemon=True)
        self._receiver.start()

    def send(self, message: EngineInput) -> None:
        """On the event loop (the input socket's one thread)."""
        self._inputs.send(encoder.encode(message), copy=False)

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def shutdown(self) -> None:
        """Asks the engine process to stop (the server drained its requests), then reaps it."""
        self._closing = True
        if self.is_alive():
            self.send(Shutdown())
        self._reap()
        if self._receiver is not None:
            self._receiver.join(timeout=5)
        self._inputs.close(linger=0)
        self._outputs.close(linger=0)
        self._context.term()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    # -- the receiver thread --------------------------------------------------------------------
    def _receive(self) -> None:
        frontend, socket = self._frontend, self._outputs
        while not self._closing:
            if not socket.poll(RECEIVE_POLL_MS):
                code = self.process.poll()
                if code is not None and not self._closing:
                    frontend.engine_died(RuntimeError(f"the engine process exited ({_describe(code)})"))
                    return
                continue
            message = message_decoder.decode(socket.recv(copy=False).buffer)
            if isinstance(message, Steps):
                self.stats = message.stats
                if message.outputs:
                    frontend.deliver_steps(message.outputs)
            elif isinstance(message, Failed):
                frontend.deliver_failure(message.request_ids, remote_error(message))
            elif isinstance(message, Reply):
                frontend.deliver_reply(message.call_id, message.value)

    def _reap(self) -> None:
        try:
            self.process.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.log(f"engine core: process {self.process.pid} did not stop in {SHUTDOWN_TIMEOUT_S} s; killing it")
            self._kill()

    def _kill(self) -> None:
        self.process.kill()
        self.process.wait()


def _describe(returncode: int) -> str:
    if returncode < 0:
        import signal

        return f"killed by {signal.Signals(-returncode).name}"
    return f"status {returncode}"
