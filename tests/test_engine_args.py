"""One parser for the engine's flags, generated from EngineConfig (jaxserve/engine_args.py), shared
by `jaxserve serve`, `jaxserve chat` and the engine scripts; the CPU plan chosen at the entry points
only; `make serve PORT=... HOST=...` leaves the plan alone; no PyTorch advice from transformers."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxserve.config import EngineConfig
from jaxserve.engine_args import (
    CPU_PLAN,
    PLAN_FIELDS,
    add_engine_args,
    default_plan,
    engine_config,
    engine_kwargs,
    given,
    with_plan,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def serve_parser() -> argparse.ArgumentParser:
    from jaxserve.cli import _add_serve_parser

    parser = argparse.ArgumentParser()
    _add_serve_parser(parser.add_subparsers(dest="command"))
    return parser


def test_every_field_has_a_flag_and_no_flags_mean_engine_config_defaults():
    args = serve_parser().parse_args(["serve"])
    for field in dataclasses.fields(EngineConfig):
        assert hasattr(args, field.name), field.name
    assert given(args) == frozenset()
    assert engine_config(args) == EngineConfig()


def test_vllm_flag_names_and_ours():
    args = serve_parser().parse_args(
        "serve --block-size 8 --num-gpu-blocks-override 32 -tp 2 --no-enable-prefix-caching --no-async-scheduling "
        "--max-model-len 512 --dtype bfloat16 --no-executable-cache --attention-impl xla".split()
    )
    c = engine_config(args)
    assert (c.page_size, c.num_kv_pages, c.tensor_parallel_size, c.max_model_len) == (8, 32, 2, 512)
    assert not c.enable_prefix_caching and not c.async_scheduling and c.executable_cache is False
    assert (c.dtype, c.attention_impl) == ("bfloat16", "xla")
    # the older spellings the scripts used still parse
    old = serve_parser().parse_args(["serve", "--page-size", "32", "--num-kv-pages", "7"])
    assert (engine_config(old).page_size, engine_config(old).num_kv_pages) == (32, 7)
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["serve", "--dtype", "int3"])


def test_kv_cache_dtype_by_flag_keyword_and_environment():
    """vLLM's names: fp8 = fp8_e4m3, fp8_e5m2; --calculate-kv-scales refused, never ignored."""
    for name, dtype in (
        ("auto", None),
        ("fp8", "float8_e4m3fn"),
        ("fp8_e4m3", "float8_e4m3fn"),
        ("fp8_e5m2", "float8_e5m2"),
    ):
        c = engine_config(serve_parser().parse_args(["serve", "--kv-cache-dtype", name]))
        assert (c.kv_cache_dtype, c.kv_dtype_name) == (name, dtype)
        assert EngineConfig(kv_cache_dtype=name) == c
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["serve", "--kv-cache-dtype", "int8"])
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp8_e4m3fn")
    with pytest.raises(ValueError, match="calculate_kv_scales needs fp8 KV pages"):
        engine_config(serve_parser().parse_args(["serve", "--calculate-kv-scales"]))
    c = engine_config(serve_parser().parse_args(["serve", "--kv-cache-dtype", "fp8", "--calculate-kv-scales"]))
    assert c.calculate_kv_scales and EngineConfig(kv_cache_dtype="fp8", calculate_kv_scales=True) == c
    from jaxserve.app import settings_from_env

    env = {"JAXSERVE_KV_CACHE_DTYPE": "fp8_e5m2", "JAXSERVE_MAX_NUM_SEQS": "8"}
    assert settings_from_env(env).engine.kv_dtype_name == "float8_e5m2"


def test_the_cpu_plan_only_when_no_plan_field_is_set():
    logged = []
    args = serve_parser().parse_args(["serve", "--port", "8100", "--max-model-len", "512"])
    c = engine_config(args, plan=default_plan("cpu"), log=logged.append)
    assert {k: getattr(c, k) for k in CPU_PLAN} == CPU_PLAN and c.max_model_len == 512
    assert len(logged) == 1 and "--max-num-seqs 8" in logged[0]
    for flag in (
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--min-token-bucket",
        "--token-bucket-growth",
        "--row-bucket-growth",
    ):
        args = serve_parser().parse_args(["serve", flag, "4"])
        c = engine_config(args, plan=default_plan("cpu"), log=logged.append)
        field = flag[2:].replace("-", "_")
        others = {k: getattr(c, k) for k in PLAN_FIELDS if k != field}
        assert getattr(c, field) == 4 and others == {k: getattr(EngineConfig(), k) for k in others}, flag
    assert len(logged) == 1
    # a GPU: EngineConfig's plan
    assert engine_config(serve_parser().parse_args(["serve"]), plan=default_plan("gpu")) == EngineConfig()
    assert with_plan({"dtype": "float32"}, default_plan("gpu")) == ({"dtype": "float32"}, False)


def test_the_cpu_plan_compiles_two_shapes_and_token_growth_defaults_to_powers_of_two():
    from jaxserve.engine.buckets import BucketPlan

    c = EngineConfig(**CPU_PLAN)
    plan = BucketPlan.make(
        c.max_num_batched_tokens, c.max_num_seqs, c.min_token_bucket, c.row_bucket_growth, c.token_bucket_growth
    )
    assert plan.shapes == [(16, 8), (64, 8)]
    assert BucketPlan.make(2048, 256).token_buckets == (16, 32, 64, 128, 256, 512, 1024, 2048)
    assert BucketPlan.make(2048, 256, token_growth=8).token_buckets == (16, 128, 1024, 2048)
    with pytest.raises(ValueError, match="token_bucket_growth"):
        EngineConfig(token_bucket_growth=1)


def test_fallbacks_fill_only_what_the_command_line_left_unset():
    args = serve_parser().parse_args(["serve", "m1", "--cache-dir", "/flag"])
    c = engine_config(args, model=args.model_tag, cache_dir="/env")
    assert (c.model, c.cache_dir) == ("m1", "/flag")
    args = serve_parser().parse_args(["serve", "m1", "--model", "m2"])
    assert engine_config(args, model=args.model_tag, cache_dir="/env").model == "m2"


def test_script_defaults_show_in_help_and_give_way_to_flags():
    p = argparse.ArgumentParser()
    add_engine_args(p, defaults={"model": "llama-3.2-1b", "max_num_seqs": 64}, skip=("dtype",))
    assert "llama-3.2-1b" in p.format_help() and "--dtype" not in p.format_help()
    assert engine_kwargs(p.parse_args([])) == {"model": "llama-3.2-1b", "max_num_seqs": 64}
    assert engine_kwargs(p.parse_args(["--max-num-seqs", "2", "--seed", "3"])) == {
        "model": "llama-3.2-1b",
        "max_num_seqs": 2,
        "seed": 3,
    }


def test_llm_takes_the_cpu_plan_without_plan_arguments(monkeypatch):
    import jaxserve.llm

    built = []
    monkeypatch.setattr(jaxserve.llm, "LLMEngine", lambda config, **_: built.append(config))
    jaxserve.llm.LLM()
    jaxserve.llm.LLM(max_num_seqs=2, dtype="float32")
    assert {k: getattr(built[0], k) for k in CPU_PLAN} == CPU_PLAN
    assert (built[1].max_num_seqs, built[1].max_num_batched_tokens) == (2, EngineConfig().max_num_batched_tokens)


def test_the_uvicorn_entry_takes_the_cpu_plan_without_plan_variables():
    from jaxserve.app import settings_from_env

    assert {k: getattr(settings_from_env({}).engine, k) for k in CPU_PLAN} == CPU_PLAN
    engine = settings_from_env({"JAXSERVE_MAX_NUM_SEQS": "4"}).engine
    assert (engine.max_num_seqs, engine.max_num_batched_tokens) == (4, EngineConfig().max_num_batched_tokens)


def engine_flag_names() -> set[str]:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    return {s for a in p._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("*.py")))
def test_scripts_neither_redeclare_engine_flags_nor_edit_sys_path(script):
    source = (SCRIPTS / script).read_text()
    assert "sys.path" not in source, f"{script} edits sys.path: import from the package instead"
    calls = {
        getattr(n.func, "id", getattr(n.func, "attr", None))
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.Call)
    }
    if calls & {"LLM", "LLMEngine", "EngineConfig"}:  # an engine script (not a client, not a converter)
        declared = set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", source))
        assert not declared & engine_flag_names(), f"{script} declares engine flags itself: use add_engine_args"
        assert "add_engine_args" in source, f"{script} builds an engine without the shared engine flags"


def test_make_serve_passes_host_and_port_and_leaves_the_plan_alone():
    out = subprocess.run(
        # --no-print-directory: under `make test` the nested make would add "Leaving directory" lines
        ["make", "--no-print-directory", "-n", "serve", "PORT=8100", "HOST=0.0.0.0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    line = out.splitlines()[-1]
    assert line.endswith("jaxserve serve --host 0.0.0.0 --port 8100"), line


def test_no_pytorch_advice_from_transformers_at_the_entry_points(monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}
    code = "import jaxserve.app, transformers.utils.import_utils; from transformers import AutoTokenizer"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "PyTorch was not found" not in r.stderr + r.stdout
    monkeypatch.delenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", raising=False)
    from jaxserve.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] == "1"


def test_multi_gpu_environment_turns_nvlink_multicast_off_at_tp_above_1():
    from jaxserve.engine_args import multi_gpu_environment

    env: dict[str, str] = {}
    multi_gpu_environment(1, env)
    assert env == {}
    multi_gpu_environment(4, env)
    assert env == {"NCCL_NVLS_ENABLE": "0"}
    chosen = {"NCCL_NVLS_ENABLE": "1"}  # the caller's own choice stands
    multi_gpu_environment(4, chosen)
    assert chosen == {"NCCL_NVLS_ENABLE": "1"}
