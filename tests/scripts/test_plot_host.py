"""scripts/plot_host.py: reads bench_host's JSON (pure-decode cases only) and draws the plot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load():
    spec = importlib.util.spec_from_file_location("plot_host", ROOT / "scripts" / "plot_host.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(path: Path, host_ms: dict[tuple[int, int], float]) -> None:
    cases = [{"rows": r, "prefill_tokens": p, "host_ms_per_step": x} for (r, p), x in host_ms.items()]
    path.write_text(json.dumps(cases))


def test_decode_runs_keeps_pure_decode_cases_by_rows(tmp_path):
    write_run(tmp_path / "a_1.json", {(256, 0): 1.2, (1, 0): 0.5, (64, 512): 9.0})
    write_run(tmp_path / "a_2.json", {(1, 0): 0.4, (256, 0): 1.0})
    assert load().decode_runs(str(tmp_path / "a_*.json")) == {1: [0.5, 0.4], 256: [1.2, 1.0]}


def test_draws_the_plot_and_refuses_an_empty_glob(tmp_path, monkeypatch):
    write_run(tmp_path / "before_1.json", {(1, 0): 0.5, (256, 0): 1.2})
    write_run(tmp_path / "after_1.json", {(1, 0): 0.4, (256, 0): 0.9})
    out = tmp_path / "host.png"
    module = load()
    argv = ["plot_host", "--before", str(tmp_path / "before_*.json"), "--after", str(tmp_path / "after_*.json")]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    module.main()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setattr(sys, "argv", ["plot_host", "--before", str(tmp_path / "none_*.json"), "--after", "x"])
    with pytest.raises(SystemExit, match="no files match"):
        module.main()
