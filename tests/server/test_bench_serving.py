"""scripts/bench_serving.py against the test server with `vllm bench serve`'s command line: every
request succeeds, and the result block and the saved JSON carry vLLM's lines and keys."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tests.server.conftest import API_KEY, MODEL_NAME

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_serving.py"
BLOCK = [
    "Successful requests:",
    "Failed requests:",
    "Maximum request concurrency:",
    "Benchmark duration (s):",
    "Total input tokens:",
    "Total generated tokens:",
    "Request throughput (req/s):",
    "Output token throughput (tok/s):",
    "Total token throughput (tok/s):",
    "Mean TTFT (ms):",
    "Median TTFT (ms):",
    "P99 TTFT (ms):",
    "Mean TPOT (ms):",
    "Median TPOT (ms):",
    "P99 TPOT (ms):",
    "Mean ITL (ms):",
    "Median ITL (ms):",
    "P99 ITL (ms):",
]


def load_script():
    spec = importlib.util.spec_from_file_location("bench_serving", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vllm_command_line_and_result_block(server, tiny_chat_model, tmp_path, capsys):
    argv = (
        f"--backend openai --base-url {server.url} --api-key {API_KEY} --tokenizer {tiny_chat_model} "
        "--dataset-name random --random-input-len 24 --random-output-len 5 --random-range-ratio 0.2 "
        "--num-prompts 6 --max-concurrency 3 --request-rate 50 --burstiness 0.5 --ignore-eos "
        f"--metric-percentiles 50,99 --save-result --result-dir {tmp_path} --result-filename r.json"
    ).split()
    result = load_script().main(argv)
    out = capsys.readouterr().out
    values = {}
    for line in out.splitlines():
        label, _, value = line.rpartition(":")
        values[label + ":"] = value.strip()
    for label in BLOCK:
        assert label in values, (label, out)
    assert values["Successful requests:"] == "6" and values["Failed requests:"] == "0"
    assert values["Request rate configured (RPS):"] == "50.00"
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["completed"] == 6 and saved["model_id"] == MODEL_NAME
    assert saved["total_output_tokens"] == sum(saved["output_lens"]) == sum(result["output_lens"])
    assert all(4 <= n <= 6 for n in saved["output_lens"])  # 5 +- 20%, every one generated in full (ignore_eos)
    assert saved["total_input_tokens"] == sum(saved["input_lens"])
    for key in (
        "request_throughput",
        "output_throughput",
        "mean_ttft_ms",
        "median_tpot_ms",
        "p99_itl_ms",
        "p50_ttft_ms",
    ):
        assert saved[key] > 0, key


def test_chat_backend_counts_tokens_too(server, tiny_chat_model, capsys):
    argv = (
        f"--backend openai-chat --base-url {server.url} --api-key {API_KEY} --tokenizer {tiny_chat_model} "
        "--random-input-len 12 --random-output-len 4 --num-prompts 3 --ignore-eos --probe-interval 0"
    ).split()
    result = load_script().main(argv)
    assert result["completed"] == 3 and result["total_output_tokens"] == 12
