"""The engine core in a process of its own, and what happens when a process dies (each test starts
its own server: the shared one must live on).

    engine process SIGKILLed mid-stream -> every open stream ends with an error event, /health 503,
                                           the server exits non-zero
    SIGTERM to the API server           -> both processes exit, none is left behind
    SIGKILL to the API server           -> the engine process dies with it (the device is free)
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.server.conftest import ENGINE_ENV, ServerProcess, free_port


def descendants(pid: int) -> list[int]:
    """Every live process below pid (from /proc: Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm)": state, ppid, ...
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def start_server(tiny_chat_model) -> ServerProcess:
    port = free_port()
    env = dict(
        ENGINE_ENV,
        JAXSERVE_MODEL=str(tiny_chat_model),
        JAXSERVE_ENGINE_IN_PROCESS="0",
        JAXSERVE_SERVED_MODEL_NAME="tiny",
    )
    args = ["-m", "uvicorn", "jaxserve.app:app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return ServerProcess(args, env, port).wait_ready()


def engine_pid(server: ServerProcess) -> int:
    pids = [p for p in descendants(server.proc.pid) if "jaxserve.engine.core_process" in _cmdline(p)]
    assert len(pids) == 1, pids
    return pids[0]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_engine_killed_mid_stream_fails_every_stream_and_the_server_exits(tiny_chat_model):
    server = start_server(tiny_chat_model)
    try:
        engine = engine_pid(server)
        streams = 4
        started = [threading.Event() for _ in range(streams)]
        chunks: list[list[str]] = [[] for _ in range(streams)]

        def stream(i: int) -> None:
            body = {"prompt": f"story {i}", "max_tokens": 240, "ignore_eos": True, "stream": True, "model": "tiny"}
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        chunks[i].append(line)
                        started[i].set()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        assert all(e.wait(timeout=60) for e in started)
        os.kill(engine, signal.SIGKILL)
        at_kill = time.monotonic()
        assert wait_until(lambda: any(c[-1] == "data: [DONE]" for c in chunks), timeout=10)
        health = httpx.get(f"{server.url}/health", timeout=5)
        assert health.status_code == 503
        for t in threads:
            t.join(timeout=10)
        assert time.monotonic() - at_kill < 10  # at once, never a hang
        for lines in chunks:
            assert lines[-1] == "data: [DONE]"
            error = json.loads(lines[-2].removeprefix("data: "))["error"]
            assert error["code"] == "engine_error" and "engine process exited" in error["message"], error
        assert server.proc.wait(timeout=30) == 1, server.output()
    finally:
        server.stop()


def test_sigterm_leaves_no_process_behind(tiny_chat_model):
    server = start_server(tiny_chat_model)
    try:
        engine = engine_pid(server)
        below = descendants(server.proc.pid)
        server.proc.send_signal(signal.SIGTERM)
        # uvicorn's command line re-raises the SIGTERM it handled (`jaxserve serve` exits 0: test_shutdown.py)
        assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM), server.output()
        assert wait_until(lambda: not any(alive(p) for p in below), timeout=10), [p for p in below if alive(p)]
        assert not alive(engine)
    finally:
        server.stop()


def test_sigkill_of_the_api_server_takes_the_engine_process_with_it(tiny_chat_model):
    server = start_server(tiny_chat_model)
    try:
        engine = engine_pid(server)
        # its sockets are in Linux's abstract namespace: nothing on disk for a SIGKILL to leave behind
        name = f"@jaxserve-engine-{server.proc.pid}-"
        assert name in Path("/proc/net/unix").read_text()
        server.proc.kill()
        server.proc.wait(timeout=10)
        assert wait_until(lambda: not alive(engine), timeout=10)
        assert wait_until(lambda: name not in Path("/proc/net/unix").read_text(), timeout=10)
    finally:
        server.stop()


def test_engine_killed_while_idle_the_server_exits_non_zero(tiny_chat_model):
    server = start_server(tiny_chat_model)
    try:
        os.kill(engine_pid(server), signal.SIGKILL)
        assert server.proc.wait(timeout=30) == 1, server.output()
    finally:
        server.stop()
