"""scripts/bench_host.py at tiny sizes: every case runs to the end and the JSON has the agreed shape."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_host.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_host", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_host_cases_and_json(tmp_path, monkeypatch, capsys):
    bench = load_script()
    out = tmp_path / "host.json"
    argv = ["bench_host.py", "--cases", "1,8,2+6", "--warm", "2", "--steps", "5", "--min-token-bucket", "8"]
    monkeypatch.setattr(sys, "argv", argv + ["--output-json", str(out)])
    bench.main()

    cases = json.loads(out.read_text())
    assert [(c["rows"], c["prefill_tokens"]) for c in cases] == [(1, 0), (8, 0), (2, 6)]
    for c in cases:
        assert isinstance(c["rows"], int) and isinstance(c["prefill_tokens"], int)
        assert isinstance(c["host_ms_per_step"], float) and c["host_ms_per_step"] > 0
        assert c["wall_ms_per_step"] > 0
    assert [c["tokens_per_step"] for c in cases] == [1, 8, 8]  # decode rows (+ one prefill chunk) per step
    table = capsys.readouterr().out
    assert "host ms" in table and "wall ms" in table


def test_parse_cases():
    assert load_script().parse_cases("1, 64+512") == [(1, 0), (64, 512)]
