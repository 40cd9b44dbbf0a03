"""Serving from several processes (hosts): one engine core per JAX process, one mesh, one schedule.

    process 0 (leader): API server --ZMQ--> engine core process        process i > 0 (follower):
                                                                        `jaxserve serve ... --process-id i`,
                                                                        no HTTP
    start: jax.distributed.initialize -> agree(): every process's engine config digest gathered
           (a mismatch fails them all, before any step), process 0's seed broadcast
           -> LLMEngine (model over the global mesh, warm-up: the same programs everywhere)
    each turn of the core loop, on every process, the same calls in the same order:
      leader:   drain its ZMQ inputs ──InputBroadcast.exchange──> follower: the same inputs
      both:     CoreLoop.apply(each input, in order); stop after Shutdown; CoreLoop.turn() (a step,
                if there is work: the scheduler's state is the same everywhere, so is the decision)
      leader:   outputs -> the API server                        follower: outputs dropped
    idle: the leader exchanges an empty list every IDLE_POLL_MS; a follower blocks in exchange
          until the leader's next turn (a step, a heartbeat or Shutdown)
    stop: Shutdown is broadcast like any input (the API server gone counts as one), then
          jax.distributed.shutdown() on every process

What makes the schedules identical: the same inputs in the same order at the same turn, the same
config, and the same seed for requests that bring none (the core's generator, seeded from process
0's). Nothing in the scheduler depends on time. A process that dies takes the others down through
jax.distributed's heartbeat timeout (89 s on the CPU; the API server then sees its engine process
die: 503, exit 1).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import msgspec
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.config import DistributedConfig, EngineConfig
from jaxserve.engine.core_loop import CoreLoop
from jaxserve.engine.messages import EngineInput, encoder

FIRST_BYTES = 4096  # every exchange broadcasts this many bytes; a longer message follows in a second one
_LENGTH = 4  # bytes of the length prefix
_decoder = msgspec.msgpack.Decoder(list[EngineInput])


def initialize(dist: DistributedConfig) -> None:
    """Joins jax.distributed (before anything initialises a JAX backend in this process). On CPUs
    cross-process collectives need gloo; the setting touches only the CPU backend."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=dist.coordinator_address, num_processes=dist.num_processes, process_id=dist.process_id
    )


def config_digest(config: EngineConfig) -> bytes:
    """What every process must agree on: the engine config less the cache folder (a host's own)."""
    fields = {k: str(v) for k, v in dataclasses.asdict(config).items() if k != "cache_dir"}
    return hashlib.sha256(msgspec.json.encode(dict(sorted(fields.items())))).digest()


def agree(config: EngineConfig, seed: int) -> int:
    """Every process calls this once, before building its engine: fails everywhere alike if the
    configs differ (so that no process waits in a collective another never makes); returns
    process 0's seed for the requests that bring none."""
    digests = multihost_utils.process_allgather(np.frombuffer(config_digest(config), np.uint8))
    differ = [i for i, d in enumerate(np.asarray(digests)) if not np.array_equal(d, digests[0])]
    if differ:
        raise ValueError(
            f"the engine flags of process(es) {differ} differ from process 0's: start every process with the "
            "same model and engine flags"
        )
    words = np.frombuffer(np.uint64(seed % 2**64).tobytes(), np.uint8)
    return int(np.frombuffer(np.asarray(multihost_utils.broadcast_one_to_all(words)).tobytes(), np.uint64)[0])


class ByteBroadcast:
    """broadcast(bytes uint8 [W], is_source) -> process 0's [W] on every process. What
    multihost_utils.broadcast_one_to_all does, with the mesh, shardings and one compiled program
    per width kept, so that a step pays a transfer and a collective, not their set-up (0.7 ms of
    host CPU a call on the 2-core CPU otherwise). Each process contributes a row of a
    [processes, W] array, zeros but the source's; the sum over processes is the source's row."""

    def __init__(self):
        devices = np.asarray(jax.devices()).reshape(jax.process_count(), jax.local_device_count())
        mesh = Mesh(devices, ("processes", "local"))
        self._rows = NamedSharding(mesh, PartitionSpec("processes"))
        self._sum = jax.jit(
            lambda rows: rows.sum(0, dtype=jnp.uint8), out_shardings=NamedSharding(mesh, PartitionSpec())
        )

    def __call__(self, data: np.ndarray, is_source: bool) -> np.ndarray:
        row = (data if is_source else np.zeros_like(data))[None]
        rows = jax.make_array_from_process_local_data(self._rows, row, (jax.process_count(), data.shape[0]))
        return np.asarray(self._sum(rows).addressable_data(0))


class InputBroadcast:
    """Process 0's engine inputs for one turn, on every process: msgpack, length-prefixed, as uint8
    arrays broadcast from process 0 (a collective: every process calls exchange once per turn).
    One broadcast of FIRST_BYTES per turn; a longer message (a long prompt) follows in a second
    one, padded to a power of two so that few shapes ever compile."""

    def __init__(self, is_leader: bool):
        self.is_leader = is_leader
        self.exchanges = 0
        self.inputs = 0
        self._broadcast = ByteBroadcast()

    def exchange(self, inputs: list[EngineInput]) -> list[EngineInput]:
        """Leader: its inputs, sent; followers (pass []): the leader's, received."""
        first = np.zeros(FIRST_BYTES, np.uint8)
        payload = b""
        if self.is_leader:
            payload = encoder.encode(inputs)
            first[:_LENGTH] = np.frombuffer(np.uint32(len(payload)).tobytes(), np.uint8)
            head = payload[: FIRST_BYTES - _LENGTH]
            first[_LENGTH : _LENGTH + len(head)] = np.frombuffer(head, np.uint8)
        first = self._broadcast(first, self.is_leader)
        length = int(np.frombuffer(first[:_LENGTH].tobytes(), np.uint32)[0])
        if length <= FIRST_BYTES - _LENGTH:
            data = first[_LENGTH : _LENGTH + length].tobytes()
        else:
            rest = np.zeros(1 << (length - 1).bit_length(), np.uint8)
            if self.is_leader:
                rest[:length] = np.frombuffer(payload, np.uint8)
            data = self._broadcast(rest, self.is_leader)[:length].tobytes()
        received = _decoder.decode(data)
        self.exchanges += 1
        self.inputs += len(received)
        return received


class FollowerSink:
    """A follower's CoreLoop results: process 0 streams them; a failure is logged here too."""

    def __init__(self, log: Callable):
        self.log = log
        self.steps_seen = 0

    def steps(self, outputs) -> None:
        self.steps_seen += len(outputs)

    def failed(self, request_ids, error: BaseException) -> None:
        self.log(f"requests {list(request_ids)} failed: {type(error).__name__}: {error}")

    def reply(self, call_id: int, value: int) -> None:
        pass


def follow(core, broadcast: InputBroadcast, log: Callable = print, sink: FollowerSink | None = None) -> None:
    """A follower's serving loop: the leader's inputs, applied in its order, then the same step;
    returns after a broadcast Shutdown."""
    sink = sink or FollowerSink(log)
    loop = CoreLoop(core, sink)
    while not loop.shutdown_requested:
        for message in broadcast.exchange([]):  # blocks until the leader's next turn
            loop.apply(message)
        if loop.shutdown_requested:
            break
        loop.turn()
    log(
        f"follower: shut down after {broadcast.exchanges} turns, {broadcast.inputs} inputs from process 0, "
        f"{sink.steps_seen} step outputs"
    )


def run_follower(
    config: EngineConfig, dist: DistributedConfig, *, fault_token_id: int | None = None, log: Callable = print
) -> int:
    """`jaxserve serve --process-id i` (i > 0), after initialize(): the engine on this process's
    devices, serving process 0's requests until it shuts down."""
    from jaxserve.engine.faults import inject_step_failure
    from jaxserve.engine.llm_engine import LLMEngine

    seed = agree(config, 0)
    engine = LLMEngine(config, log=log)
    engine.core.reseed(seed)
    if fault_token_id is not None:
        inject_step_failure(engine, fault_token_id)
    log(f"process {dist.process_id} of {dist.num_processes}: engine ready, following process 0")
    follow(engine.core, InputBroadcast(is_leader=False), log)
    jax.distributed.shutdown()
    return 0
