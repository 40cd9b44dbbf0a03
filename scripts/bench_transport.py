"""What the engine process's per-step message costs: encode + send + receive + decode of one Steps
message (messages.py) over the ZMQ ipc sockets the server uses, for a step of R requests.

    python scripts/bench_transport.py [--requests 256] [--logprobs 0] [--iters 2000]

Measured: msgpack encode and decode alone (in this process), and a ping-pong with a second process
that decodes each message and answers with a small one (an Abort): the round trip less the small
reply's own cost bounds one step message's one-way cost (transfer and both codecs included) from above.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import zmq

from jaxserve.engine.core import EngineCoreOutput
from jaxserve.engine.messages import Abort, EngineStats, Steps, TokenLogprobs, encoder, input_decoder, message_decoder


def step_message(requests: int, logprobs: int, finished: int = 8) -> Steps:
    rng = np.random.default_rng(0)
    ids = [f"cmpl-{rng.integers(1 << 60):016x}-0-0" for _ in range(requests)]
    tokens = [int(t) for t in rng.integers(0, 128_000, requests)]
    lps = {}
    if logprobs:
        for rid, tok in zip(ids, tokens):
            top = rng.integers(0, 128_000, logprobs).astype(np.int32)
            lps[rid] = TokenLogprobs(tok, -0.5, 1, top, np.sort(rng.random(logprobs, dtype=np.float32))[::-1])
    output = EngineCoreOutput(
        ids,
        tokens,
        {rid: ("length", None) for rid in ids[:finished]},
        lps,
        {},
        {},
        {},
        num_tokens=requests,
        timestamp=time.perf_counter(),
    )
    return Steps([output], EngineStats(requests, 0, 0.5, 0, 1000, 500))


def per_call_us(fn, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return 1e6 * (time.perf_counter() - t0) / iters


def echo(address_in: str, address_out: str) -> None:
    """The other process: decode each step message, answer with a small input message."""
    context = zmq.Context()
    pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    pull.connect(address_in)
    push.connect(address_out)
    reply = encoder.encode(Abort("cmpl-0"))
    while True:
        data = pull.recv(copy=False)
        if len(data) == 0:
            return
        message_decoder.decode(data.buffer)
        push.send(reply)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--logprobs", type=int, default=0, help="top logprobs per request (0: none asked)")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--echo", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo:
        return echo(*args.echo)
    message = step_message(args.requests, args.logprobs)
    data = encoder.encode(message)
    small = encoder.encode(Abort("cmpl-0"))
    encode_us = per_call_us(lambda: encoder.encode(message), args.iters)
    decode_us = per_call_us(lambda: message_decoder.decode(data), args.iters)
    small_us = per_call_us(lambda: input_decoder.decode(small), args.iters)

    folder = tempfile.mkdtemp(prefix="bench-transport-")
    to_echo, from_echo = f"ipc://{folder}/steps", f"ipc://{folder}/replies"
    context = zmq.Context()
    push, pull = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    push.bind(to_echo)
    pull.bind(from_echo)
    child = subprocess.Popen([sys.executable, __file__, "--echo", to_echo, from_echo])
    try:
        rounds = []
        for i in range(args.iters + 100):
            t0 = time.perf_counter()
            push.send(encoder.encode(message), copy=False)
            input_decoder.decode(pull.recv())
            if i >= 100:  # the first ones connect and warm up
                rounds.append(1e6 * (time.perf_counter() - t0))
        push.send(b"")
    finally:
        child.wait(timeout=10)
    rounds.sort()
    p50, p99 = statistics.median(rounds), rounds[int(0.99 * len(rounds))]
    print(f"step message: {args.requests} requests, logprobs {args.logprobs}: {len(data)} bytes")
    print(f"  encode {encode_us:.1f} us, decode {decode_us:.1f} us (in one process)")
    print(
        f"  ping-pong through a second process (encode, send, receive, decode there, answer): "
        f"round trip p50 {p50:.1f} us, p99 {p99:.1f} us (the small reply alone decodes in {small_us:.1f} us)"
    )


if __name__ == "__main__":
    main()
