"""The engine's command-line flags, generated from EngineConfig: one parser for `jaxserve serve`,
`jaxserve chat` and the engine scripts (bench_throughput, bench_latency, the GPU checks).

    EngineConfig field -> one flag: vLLM's name where vLLM has the setting (--block-size,
                          --num-gpu-blocks-override, -tp, ...), else --field-name; type and
                          default from the field, choices and help from FLAGS below
    parsed namespace   -> engine_config(args, plan=default_plan(backend), ...) -> EngineConfig

A field added to EngineConfig gets its flag here without a change to any entry point.

The plan (the compiled step shapes) is the one setting whose default depends on the device:
EngineConfig's defaults size it for a GPU; on a CPU, when the caller chose none of PLAN_FIELDS,
the entry points (`jaxserve serve`, LLM(), the uvicorn app, through default_plan and with_plan)
take CPU_PLAN, small enough for a quick first start. Nothing below the entry points resolves it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, MutableMapping

from jaxserve.config import EngineConfig

# The settings that decide the compiled step shapes (jaxserve/engine/buckets.py).
PLAN_FIELDS = ("max_num_seqs", "max_num_batched_tokens", "min_token_bucket", "token_bucket_growth", "row_bucket_growth")
# Two step shapes, 16 and 64 tokens from up to 8 requests: on a CPU each shape costs seconds at
# every start (lowering, loading, a first run), a decode step costs less at 16 tokens and a
# prompt is prefilled 64 tokens a step. `make serve` on a 2-core CPU is ready within 60 s of the
# install and 20 s warm (docs/benchmarks.md, Start-up).
CPU_PLAN = {"max_num_seqs": 8, "max_num_batched_tokens": 64, "token_bucket_growth": 4, "row_bucket_growth": 0}

# Flags set on the command line are recorded on the namespace under this name, a script's own
# engine defaults under the other.
_GIVEN = "_engine_args_given"
_SCRIPT_DEFAULTS = "_engine_args_script_defaults"


@dataclasses.dataclass(frozen=True)
class Flag:
    names: tuple[str, ...] = ()  # default: --field-name
    help: str = ""
    choices: tuple[str, ...] | None = None


FLAGS: dict[str, Flag] = {
    "model": Flag(help="HF folder, .gguf file or preset name (default: the embedded SmolLM2-135M-Instruct)"),
    "tokenizer": Flag(help="tokenizer folder (default: the model's)"),
    "load_format": Flag(choices=("auto", "safetensors", "dummy"), help="dummy: a preset's random weights"),
    "dtype": Flag(choices=("auto", "float32", "bfloat16", "float16")),
    "tensor_parallel_size": Flag(names=("--tensor-parallel-size", "-tp"), help="devices the model is split over"),
    "max_model_len": Flag(help="default: the model's context length, capped by the KV cache"),
    "max_num_seqs": Flag(help="sequences per step, the largest compiled row count (plan)"),
    "max_num_batched_tokens": Flag(help="tokens per step, the largest compiled shape (plan)"),
    "gpu_memory_utilization": Flag(help="fraction of the device memory for weights, workspace and KV cache"),
    "seed": Flag(),
    "page_size": Flag(names=("--block-size", "--page-size"), help="tokens per KV cache page"),
    "attention_impl": Flag(choices=("auto", "xla", "pallas", "reference")),
    "num_kv_pages": Flag(
        names=("--num-gpu-blocks-override", "--num-kv-pages"), help="KV cache pages (default: from memory)"
    ),
    "cpu_kv_cache_bytes": Flag(help="KV cache bytes where the device reports no memory (a CPU)"),
    "min_token_bucket": Flag(help="the smallest compiled token count (plan)"),
    "token_bucket_growth": Flag(help="factor between compiled token counts (plan)"),
    "row_bucket_growth": Flag(
        help="factor between compiled request-count buckets; 0: one per token bucket (fewer shapes: "
        "faster start-up) (plan)"
    ),
    "cache_dir": Flag(
        help="converted models, XLA's compilation cache, compiled steps (default: $JAXSERVE_CACHE_DIR or "
        "~/.cache/jaxserve)"
    ),
    "executable_cache": Flag(help="keep compiled steps in the cache folder (default: on a GPU only)"),
    "max_waiting_requests": Flag(
        help="sequences allowed to wait beyond --max-num-seqs before the server answers 503 (default 1024)"
    ),
    "async_scheduling": Flag(help="schedule step n+1 while step n runs"),
    "enable_prefix_caching": Flag(help="reuse the KV cache of prompt prefixes computed before"),
    "kv_cache_dtype": Flag(
        choices=("auto", "fp8", "fp8_e4m3", "fp8_e5m2"),
        help="KV pages: auto (the model's dtype) or fp8 (= fp8_e4m3; fp8_e5m2: more range, less precision), "
        "half of bf16's bytes, scales 1.0 (see --calculate-kv-scales)",
    ),
    "calculate_kv_scales": Flag(
        help="fp8 KV pages: estimate each layer's K and V scales from the first prefill "
        "(amax / 200 and amax / 100, as vLLM), instead of 1.0"
    ),
}


def field_type(field: dataclasses.Field):
    """bool, int, float or str from a field's annotation (`int | None` -> int, `str | Path | None` -> str)."""
    hint = typing.get_type_hints(EngineConfig)[field.name]
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return next((kind for kind in (bool, int, float) if kind in options), str)


def _record(namespace, dest: str) -> None:
    setattr(namespace, _GIVEN, getattr(namespace, _GIVEN, frozenset()) | {dest})


class _Store(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _record(namespace, self.dest)


class _Switch(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _record(namespace, self.dest)


def add_engine_args(
    parser: argparse.ArgumentParser,
    *,
    defaults: Mapping | None = None,
    skip: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
) -> argparse._ArgumentGroup:
    """One flag per EngineConfig field (`only` those, none of `skip`), in a group of its own.
    Defaults are EngineConfig's, but `defaults`: the fields a script sets for its own workload (a
    GPU check's model, say), shown in --help and passed on by engine_kwargs unless a flag
    overrides them."""
    group = parser.add_argument_group("engine (EngineConfig)")
    parser.set_defaults(**{_SCRIPT_DEFAULTS: dict(defaults or {})})
    config_defaults = EngineConfig()
    for field in dataclasses.fields(EngineConfig):
        if field.name in skip or (only is not None and field.name not in only):
            continue
        spec = FLAGS.get(field.name, Flag())
        names = spec.names or ("--" + field.name.replace("_", "-"),)
        kind = field_type(field)
        default = (defaults or {}).get(field.name, getattr(config_defaults, field.name))
        shown = "" if default is None else " (default: %(default)s)"
        if field.name in CPU_PLAN:
            shown = f" (default: %(default)s; {CPU_PLAN[field.name]} on a CPU when no plan flag is set)"
        common = dict(dest=field.name, default=default, help=(spec.help + shown).strip())
        if kind is bool:
            group.add_argument(*names, action=_Switch, **common)
        else:
            metavar = None if spec.choices else names[0].lstrip("-").upper().replace("-", "_")
            group.add_argument(*names, action=_Store, type=kind, choices=spec.choices, metavar=metavar, **common)
    return group


def multi_gpu_environment(tensor_parallel_size: int, environ: MutableMapping[str, str]) -> None:
    """For entry points, before JAX starts: a model over several GPUs runs NCCL, whose NVLink
    multicast (NVLS) stays off (NCCL_NVLS_ENABLE=0) unless the caller chose otherwise: on shared
    multi-GPU hosts it can take the GPUs out of service. Child processes inherit it."""
    if tensor_parallel_size > 1:
        environ.setdefault("NCCL_NVLS_ENABLE", "0")


def given(args: argparse.Namespace) -> frozenset[str]:
    """The EngineConfig fields set on the command line."""
    return getattr(args, _GIVEN, frozenset())


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The EngineConfig fields set on the command line, over the script's own defaults (see
    add_engine_args): what to pass to LLM(...), which resolves the rest (the CPU plan included)."""
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    return {**getattr(args, _SCRIPT_DEFAULTS, {}), **{n: getattr(args, n) for n in given(args) if n in names}}


def default_plan(backend: str) -> dict | None:
    """The plan an entry point takes when the caller chose none: CPU_PLAN on a CPU, else
    EngineConfig's defaults (None)."""
    return dict(CPU_PLAN) if backend == "cpu" else None


def with_plan(engine_args: Mapping, plan: Mapping | None) -> tuple[dict, bool]:
    """engine_args with `plan` added when they set none of PLAN_FIELDS; and whether it was."""
    if plan is None or any(name in engine_args for name in PLAN_FIELDS):
        return dict(engine_args), False
    return {**engine_args, **plan}, True


def describe_plan(plan: Mapping = CPU_PLAN, style: str = "flags") -> str:
    """The line an entry point logs when it takes the CPU plan, in its own spelling: "flags"
    (--max-num-seqs 8), "kwargs" (max_num_seqs=8) or "env" (JAXSERVE_MAX_NUM_SEQS=8)."""
    spell = {
        "flags": lambda k: "--" + k.replace("_", "-"),
        "kwargs": lambda k: k,
        "env": lambda k: "JAXSERVE_" + k.upper(),
    }[style]
    chosen = (" " if style == "flags" else ", ").join(
        f"{spell(k)}{' ' if style == 'flags' else '='}{v}" for k, v in plan.items()
    )
    others = ", ".join(spell(k) for k in PLAN_FIELDS)
    return f"plan: {chosen} (the default on a CPU, for a quick start); set any of {others} to choose your own"


def engine_config(
    args: argparse.Namespace, *, plan: Mapping | None = None, log: Callable | None = print, **fallbacks
) -> EngineConfig:
    """The EngineConfig of parsed flags. `fallbacks`: values for the fields not set on the command
    line (an entry point's own, such as the cache folder from the environment); `plan`: taken when
    neither sets a plan field (default_plan(backend) for the device's default), logged."""
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    chosen = {name: getattr(args, name) for name in given(args) if name in names}
    chosen.update({k: v for k, v in fallbacks.items() if k not in chosen and v is not None})
    chosen, planned = with_plan(chosen, plan)
    if planned and log is not None:
        log(describe_plan(plan))
    defaults = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return EngineConfig(**{**defaults, **chosen})
