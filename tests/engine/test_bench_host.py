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


def test_bench_host_final_only(tmp_path, monkeypatch):
    """FINAL_ONLY requests send nothing until they finish: settling finds its started rows
    through the engine instead of their outputs."""
    bench = load_script()
    out = tmp_path / "final.json"
    argv = ["bench_host.py", "--cases", "1,8,2+6", "--warm", "2", "--steps", "5", "--min-token-bucket", "8"]
    argv += ["--repeats", "1", "--output-kind", "final_only", "--output-json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    assert [c["tokens_per_step"] for c in json.loads(out.read_text())] == [1, 8, 8]


def test_parse_cases():
    assert load_script().parse_cases("1, 64+512") == [(1, 0), (64, 512)]


def test_bench_host_tensor_parallel_against_tp1(tmp_path, monkeypatch, capsys):
    """--tensor-parallel-size 2 runs the mock on a mesh (its pages split over 2 devices); the
    comparison runs tp 1 in the same rounds and prints the ratios."""
    bench = load_script()
    out = tmp_path / "tp.json"
    argv = ["bench_host.py", "--cases", "2", "--warm", "1", "--steps", "3", "--min-token-bucket", "8", "--repeats", "1"]
    argv += ["--tensor-parallel-size", "2", "--compare-tensor-parallel-size", "1", "--output-json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    cases = json.loads(out.read_text())
    assert [(c["tensor_parallel_size"], c["rows"]) for c in cases] == [(1, 2), (2, 2)]
    assert all(c["tokens_per_step"] == 2 for c in cases)
    assert "tp 2 / tp 1" in capsys.readouterr().out


def test_mock_model_on_a_mesh_splits_its_pages():
    """SumModel(mesh=) through the engine at tp 2: pages split by kv head, the hand-computed tokens."""
    import jax

    from jaxserve.config import EngineConfig
    from jaxserve.engine.llm_engine import LLMEngine
    from jaxserve.sampling_params import SamplingParams
    from jaxserve.testing.mock_model import SumModel, next_tokens
    from sharding import make_mesh

    config = EngineConfig(
        max_num_seqs=4,
        max_num_batched_tokens=16,
        page_size=4,
        num_kv_pages=32,
        max_model_len=64,
        tensor_parallel_size=2,
    )
    engine = LLMEngine(
        config, model=SumModel(101, mesh=make_mesh(2)), tokenizer=None, progress=False, log=lambda *_: None
    )
    pages = engine.runner.kv_cache[0].k
    assert tuple(pages.sharding.spec)[2] == "tp" and len(pages.devices()) == 2 and jax.device_count() >= 2
    prompt = [3, 5, 7]
    engine.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    out = []
    while engine.has_unfinished_requests():
        out += [o for o in engine.step() if o.finished]
    assert out[0].outputs[0].token_ids == next_tokens(prompt, 6, 101)


def test_bench_host_detokenizes_with_the_default_tokenizer(tmp_path, monkeypatch):
    """--detokenize: the engine decodes the mock's token ids with SmolLM2's tokenizer (outputs carry
    text), and the JSON says the case was detokenized."""
    from jaxserve.default_model import default_model_folder
    from jaxserve.sampling_params import SamplingParams
    from jaxserve.testing.mock_model import next_tokens
    from jaxserve.tokenizer import load_tokenizer

    bench = load_script()
    out = tmp_path / "host.json"
    argv = ["bench_host.py", "--cases", "2", "--warm", "1", "--steps", "3", "--min-token-bucket", "8", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", argv + ["--detokenize", "--output-json", str(out)])
    bench.main()
    assert [c["detokenized"] for c in json.loads(out.read_text())] == [True]

    tokenizer = load_tokenizer(default_model_folder(progress=False))
    engine = bench.build_engine([(1, 0)], 1, 2, min_token_bucket=8, tokenizer=tokenizer)
    engine.add_request("a", [20, 21, 22], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    final = []
    while engine.has_unfinished_requests():
        final += [o for o in engine.step() if o.finished]
    ids = next_tokens([20, 21, 22], 4, bench.V)
    assert final[0].outputs[0].token_ids == ids
    assert final[0].outputs[0].text == tokenizer.decode(ids) != ""
