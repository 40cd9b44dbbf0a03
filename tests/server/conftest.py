"""A real server process on loopback, built around a tiny random-weight Llama that speaks through
SmolLM2's tokenizer and chat template (vocab 49152): warm-up in seconds, real text in and out.

    tiny_chat_model  tmp folder: tiny config.json + SmolLM2 tokenizer files (load_format=dummy)
    server           one `uvicorn jaxserve.app:app` (JAXSERVE_* environment) for the whole session
    ServerProcess    start/stop helper (the SIGTERM test starts its own with `jaxserve serve`)

Under pytest-xdist each worker that runs server tests starts its own shared server (tests never
depend on another test's requests, only on their own).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "tiny-chat"
API_KEY = "test-key"
FAULT_TOKEN = 49000  # a prompt holding this token makes the engine step fail (test-only hook)
MAX_MODEL_LEN = 256
MAX_NUM_SEQS = 16
MAX_WAITING = 64

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 1024,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

# The engine settings both test servers share (same compiled shapes: the second start hits the
# persistent compilation cache). 6 step shapes: T in {16, 32} x R in {1, 4, 16}.
ENGINE_ENV = {
    "JAXSERVE_LOAD_FORMAT": "dummy",
    "JAXSERVE_MAX_NUM_SEQS": str(MAX_NUM_SEQS),
    "JAXSERVE_MAX_NUM_BATCHED_TOKENS": "32",
    "JAXSERVE_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
    "JAXSERVE_NUM_KV_PAGES": "512",
}


@pytest.fixture(scope="session")
def tiny_chat_model(smollm2_folder, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_chat")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2_folder / name).exists():
            shutil.copy(smollm2_folder / name, folder / name)
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], env: dict[str, str], port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="jaxserve-server-", suffix=".log", delete=False)
        full_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, not the tests' 8
        full_env.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 300) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


@pytest.fixture(scope="session")
def server(tiny_chat_model) -> ServerProcess:
    port = free_port()
    env = dict(
        ENGINE_ENV,
        JAXSERVE_MODEL=str(tiny_chat_model),
        JAXSERVE_SERVED_MODEL_NAME=MODEL_NAME,
        JAXSERVE_API_KEY=API_KEY,
        JAXSERVE_FAULT_TOKEN_ID=str(FAULT_TOKEN),
        JAXSERVE_MAX_WAITING_REQUESTS=str(MAX_WAITING),
    )
    proc = ServerProcess(
        ["-m", "uvicorn", "jaxserve.app:app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env,
        port,
    )
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    with OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def metric_values(http_client) -> dict[str, float]:
    """/metrics parsed by prometheus_client's own text parser: sample name (+ labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = http_client.get("/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            extra = {k: v for k, v in sample.labels.items() if k != "model_name"}
            labels = ",".join(f"{k}={v}" for k, v in sorted(extra.items()))
            key = sample.name + (f"{{{labels}}}" if labels else "")
            values[key] = sample.value
    return values


def wait_idle(http_client, timeout: float = 30) -> dict[str, float]:
    """Metrics once nothing runs, waits and no KV page is held (aborts land on the engine thread)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metric_values(http_client)
        idle = (
            m["jaxserve:num_requests_running"] == 0
            and m["jaxserve:num_requests_waiting"] == 0
            and m["jaxserve:kv_cache_usage_perc"] == 0
        )
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)
