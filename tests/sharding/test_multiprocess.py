"""The engine under jax.distributed: 2 processes on loopback, 2 CPU devices each, one tp=4 mesh
spanning both; each process gets transformers' greedy tokens."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import load_reference

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_one_mesh(tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=2")
    worker = str(Path(__file__).parent / "multiprocess_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), str(port), str(tmp_path / f"{i}.json")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    expected = load_reference("llama_gqa_llama3rope")["greedy"].tolist()
    for i in range(2):
        result = json.loads((tmp_path / f"{i}.json").read_text())
        assert result["process_count"] == 2 and result["device_count"] == 4
        assert result["tokens"] == expected
