"""`jaxserve serve --kv-cache-dtype fp8` end to end on the CPU (a server of its own: the shared one
keeps its model's dtype): the start-up line names the fp8 pages and the tokens they hold,
/metrics' cache_config_info says cache_dtype "fp8", and completions and chat, streamed and not, an
abandoned stream and the pages freed after it behave as with the model's dtype (`exercise`)."""

from __future__ import annotations

import signal

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import ServerProcess, free_port
from tests.server.test_multihost import ONE_SHAPE_FLAGS, exercise


def test_fp8_kv_cache_serves_end_to_end(tiny_chat_model):
    port = free_port()
    args = ["-m", "jaxserve", "serve", "--model", str(tiny_chat_model), "--port", str(port), *ONE_SHAPE_FLAGS]
    server = ServerProcess([*args, "--kv-cache-dtype", "fp8"], {}, port)
    try:
        server.wait_ready()
        assert "KV cache (fp8: float8_e4m3fn): 64 pages x 16 tokens = 1024 tokens fit" in server.output()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            families = text_string_to_metric_families(http.get("/metrics").text)
            (info,) = [f for f in families if f.name == "jaxserve:cache_config_info"]
            assert info.samples[0].labels["cache_dtype"] == "fp8"
        exercise(server, str(tiny_chat_model))
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0, server.output()
    finally:
        server.stop()
