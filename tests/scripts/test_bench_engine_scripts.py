"""scripts/bench_throughput.py and bench_latency.py on a tiny random-weight model on the CPU, with
vLLM's flags and the shared engine flags: vLLM's result lines and JSON keys, and the workload asked
for (every prompt, every output token)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "fixtures" / "tiny" / "llama_gqa_llama3rope"  # no tokenizer: token-id prompts
ENGINE = (
    f"--model {TINY} --max-num-seqs 4 --max-num-batched-tokens 16 --row-bucket-growth 0 "
    "--num-gpu-blocks-override 64 --max-model-len 64 --no-enable-prefix-caching"
)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_throughput_prints_vllms_lines(tmp_path, capsys):
    out = tmp_path / "t.json"
    argv = f"--input-len 12 --output-len 5 --num-prompts 6 --n 2 --output-json {out} {ENGINE}".split()
    load_script("bench_throughput").main(argv)
    text = capsys.readouterr().out
    assert "Throughput: " in text and " requests/s, " in text and " output tokens/s" in text
    assert "Total num prompt tokens:  72" in text and "Total num output tokens:  60" in text
    record = json.loads(out.read_text())
    assert record["num_requests"] == 6 and record["total_num_tokens"] == 72 + 60
    for key in ("elapsed_time", "requests_per_second", "tokens_per_second"):
        assert record[key] > 0
    assert record["results"][0]["compilations_after_warmup"] == 0


def test_bench_throughput_with_fp8_kv_reports_its_capacity(tmp_path, capsys):
    out = tmp_path / "t.json"
    argv = f"--input-len 12 --output-len 3 --num-prompts 2 --output-json {out} --kv-cache-dtype fp8 {ENGINE}".split()
    load_script("bench_throughput").main(argv)
    assert "KV cache: fp8 (float8_e4m3fn), 1024 tokens" in capsys.readouterr().out
    result = json.loads(out.read_text())["results"][0]
    assert (result["kv_cache_dtype"], result["kv_capacity_tokens"], result["compilations_after_warmup"]) == (
        "float8_e4m3fn",
        1024,
        0,
    )


def test_bench_throughput_random_needs_an_input_len():
    with pytest.raises(SystemExit, match="--input-len"):
        load_script("bench_throughput").main(f"--num-prompts 2 {ENGINE}".split())


def test_bench_latency_prints_vllms_lines(tmp_path, capsys, monkeypatch):
    from jaxserve.benchmarks import device_limits

    monkeypatch.setattr(device_limits, "copy_bandwidth", lambda: 1e11)  # the real one copies 2 GiB
    out = tmp_path / "l.json"
    argv = (
        f"--input-len 6 --output-len 4 --batch-size 2 --num-iters-warmup 1 --num-iters 3 --output-json {out} {ENGINE}"
    )
    load_script("bench_latency").main(argv.split())
    text = capsys.readouterr().out
    assert "Avg latency: " in text and text.count("% percentile latency: ") == 6
    record = json.loads(out.read_text())
    assert len(record["latencies"]) == 3 and set(record["percentiles"]) == {"10", "25", "50", "75", "90", "99"}
    assert record["avg_latency"] > 0
