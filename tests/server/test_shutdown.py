"""SIGTERM with a request in flight (`jaxserve serve`, its own process): new connections are
refused, the stream in flight runs to its end, and the process exits 0."""

from __future__ import annotations

import json
import signal
import threading

import httpx

from tests.server.conftest import ENGINE_ENV, ServerProcess, free_port


def test_sigterm_finishes_in_flight_requests_then_exits_0(tiny_chat_model):
    port = free_port()
    flags = []
    for key, value in ENGINE_ENV.items():  # the same engine as the shared server: compiled shapes are cached
        flag = key.removeprefix("JAXSERVE_").lower().replace("_", "-")
        flags += ["--" + {"num-kv-pages": "num-gpu-blocks-override"}.get(flag, flag), value]
    proc = ServerProcess(
        [
            "-m",
            "jaxserve",
            "serve",
            "--model",
            str(tiny_chat_model),
            "--port",
            str(port),
            "--uvicorn-log-level",
            "warning",
            *flags,
        ],
        {},
        port,
    )
    try:
        proc.wait_ready()
        first_chunk, chunks = threading.Event(), []

        def stream():
            body = {
                "prompt": "tell me a long story",
                "max_tokens": 240,
                "n": 16,
                "ignore_eos": True,
                "stream": True,
                "temperature": 0,
            }
            with httpx.stream("POST", f"{proc.url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        chunks.append(line)
                        first_chunk.set()

        t = threading.Thread(target=stream)
        t.start()
        assert first_chunk.wait(timeout=60)
        proc.proc.send_signal(signal.SIGTERM)
        at_signal = len(chunks)
        refused = False
        while t.is_alive() and not refused:  # while the stream runs on, new connections are refused
            try:
                httpx.get(f"{proc.url}/health", timeout=5)
            except httpx.ConnectError:
                refused = True
            except httpx.TransportError:  # accepted just before the listener closed, then dropped
                pass
        still_streaming = t.is_alive()
        assert proc.proc.wait(timeout=60) == 0, proc.output()
        t.join(timeout=10)
        assert refused and still_streaming
        assert chunks[-1] == "data: [DONE]" and len(chunks) > at_signal + 16
        finals = [json.loads(c.removeprefix("data: "))["choices"][0] for c in chunks[:-1]]
        assert sorted(c["index"] for c in finals if c["finish_reason"] == "length") == list(range(16))
    finally:
        proc.stop()
