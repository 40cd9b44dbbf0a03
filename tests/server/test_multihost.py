"""Serving over a mesh, through the openai client, on fake CPU devices:

    test_two_processes_serve_one_mesh   `jaxserve serve` twice on loopback (jax.distributed, gloo),
                                        2 CPU devices each, one tp=4 mesh over both: process 0 serves
                                        HTTP and broadcasts, process 1 follows; completions and chat,
                                        streamed and not, an abandoned stream, then SIGTERM to
                                        process 0 stops both, exit 0
    test_tensor_parallel_server         `jaxserve serve --tensor-parallel-size 4` on 4 CPU devices

A tiny random-weight model (load_format=dummy) and one step shape keep both quick. Both tests are
marked `multiprocess` (each starts its own server processes).
"""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import pytest

from tests.server.conftest import ServerProcess, free_port, wait_idle

pytestmark = pytest.mark.multiprocess

# One step shape (16 tokens, up to 4 sequences): a short warm-up on every process.
ONE_SHAPE_FLAGS = [
    "--load-format",
    "dummy",
    "--max-num-seqs",
    "4",
    "--max-num-batched-tokens",
    "16",
    "--row-bucket-growth",
    "0",
    "--max-model-len",
    "128",
    "--num-gpu-blocks-override",
    "64",
    "--seed",
    "0",
]
ENGINE_FLAGS = [*ONE_SHAPE_FLAGS, "--tensor-parallel-size", "4"]
GREEDY = dict(temperature=0, max_tokens=6)


def serve_args(model, port: int, *extra: str) -> list[str]:
    return ["-m", "jaxserve", "serve", "--model", str(model), "--port", str(port), *ENGINE_FLAGS, *extra]


def exercise(server: ServerProcess, name: str) -> None:
    """Completions and chat, streamed and not (greedy: the same text both ways), an abandoned
    stream (the engine frees it and serves on)."""
    from openai import OpenAI

    with OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120) as client:
        whole = client.completions.create(model=name, prompt="The capital of France is", **GREEDY)
        assert whole.usage.completion_tokens == 6 and whole.choices[0].finish_reason == "length"
        parts = client.completions.create(model=name, prompt="The capital of France is", stream=True, **GREEDY)
        assert "".join(c.choices[0].text for c in parts if c.choices) == whole.choices[0].text

        messages = [{"role": "user", "content": "Say hi."}]
        chat = client.chat.completions.create(model=name, messages=messages, **GREEDY)
        streamed = client.chat.completions.create(model=name, messages=messages, stream=True, **GREEDY)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == chat.choices[0].message.content and chat.usage.completion_tokens == 6

        # a request whose message (4.3 KiB) outgrows the first broadcast; 300 zero biases: the same tokens
        ids = list(range(1000, 1120))
        plain = client.completions.create(model=name, prompt=ids, **GREEDY)
        zero_bias = {str(1000 + i): 0 for i in range(300)}
        biased = client.completions.create(model=name, prompt=ids, logit_bias=zero_bias, **GREEDY)
        assert biased.choices[0].text == plain.choices[0].text

        # a client that leaves mid-stream: its request is aborted on every process
        stream = client.completions.create(
            model=name, prompt="Count:", stream=True, max_tokens=100, extra_body={"ignore_eos": True}
        )
        for i, _ in enumerate(stream):
            if i == 2:
                break
        stream.close()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        m = wait_idle(http)
        assert m["jaxserve:num_requests_running"] == 0 and m["jaxserve:kv_cache_usage_perc"] == 0
    with OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120) as client:
        again = client.completions.create(model=name, prompt="The capital of France is", **GREEDY)
        assert again.choices[0].text == whole.choices[0].text


def test_two_processes_serve_one_mesh(tiny_chat_model):
    coordinator, port = f"127.0.0.1:{free_port()}", free_port()
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    several = ["--coordinator-address", coordinator, "--num-processes", "2"]
    follower = ServerProcess(serve_args(tiny_chat_model, free_port(), *several, "--process-id", "1"), env, 0)
    leader = ServerProcess(serve_args(tiny_chat_model, port, *several, "--process-id", "0"), env, port)
    try:
        leader.wait_ready()
        exercise(leader, str(tiny_chat_model))
        leader.proc.send_signal(signal.SIGTERM)  # drain, Shutdown to the engine, broadcast to process 1
        assert leader.proc.wait(timeout=60) == 0, leader.output()
        assert follower.proc.wait(timeout=60) == 0, follower.output()
        log = follower.output()
        assert "following process 0" in log and "follower: shut down after" in log, log
        assert "the HTTP flags given (--port) apply to process 0 only" in log, log  # said, not silently dropped
        # the follower applied the leader's inputs (5 requests, an abort, ...) and stepped
        assert " 0 inputs" not in log and " 0 step outputs" not in log, log
    finally:
        for p in (leader, follower):
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
        leader.stop()
        follower.stop()


def test_tensor_parallel_server(tiny_chat_model):
    port = free_port()
    server = ServerProcess(
        serve_args(tiny_chat_model, port), {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, port
    )
    try:
        server.wait_ready()
        exercise(server, str(tiny_chat_model))
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0, server.output()
    finally:
        server.stop()


def test_bad_distributed_flags_are_refused():
    """Flags that could not take effect are errors, not silently dropped."""
    for flags, message in [
        (["--num-processes", "2"], "needs --coordinator-address"),
        (["--coordinator-address", "127.0.0.1:1"], "need --num-processes > 1"),
        (["--num-processes", "2", "--coordinator-address", "h:1", "--process-id", "2"], "--process-id must be"),
        (["--num-processes", "2", "--coordinator-address", "nohostport"], "HOST:PORT"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "jaxserve", "serve", *flags], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 2 and message in done.stderr, (flags, done.stderr)


def test_settings_refuse_an_http_follower():
    from jaxserve.config import DistributedConfig
    from jaxserve.server.settings import ServerSettings

    with pytest.raises(ValueError, match="only process 0 serves HTTP"):
        ServerSettings(distributed=DistributedConfig("127.0.0.1:1", 2, 1))
    with pytest.raises(ValueError, match="--engine-in-process"):
        ServerSettings(distributed=DistributedConfig("127.0.0.1:1", 2, 0), engine_in_process=True)
