"""Offline throughput, in the manner of `vllm bench throughput`: random-token prompts of a fixed
length, a fixed number of output tokens each (ignore_eos), all submitted at once.

    python scripts/bench_throughput.py --input-len 128 --output-len 64 --num-prompts 16
    python scripts/bench_throughput.py --model llama-3.1-8b --load-format dummy --input-len 1024 --output-len 1024 --num-prompts 1000

--backend transformers runs transformers' continuous batching (`model.generate_batch`) on the
same prompts for comparison; it needs torch (see scripts/make_reference_fixtures.py for a venv)
and a model folder. Prints "Throughput: X requests/s, Y total tokens/s, Z output tokens/s".
The clock starts after start-up (loading, warm-up compilation) and stops when the last request ends.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(100, vocab - 100, size=(num, length)).tolist()  # clear of special ids at either end


def run_jaxserve(args) -> dict:
    import dataclasses

    import jax

    from jaxserve import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
              gpu_memory_utilization=args.gpu_memory_utilization, attention_impl=args.attention_impl,
              num_kv_pages=args.num_kv_pages, seed=args.seed)
    startup = time.perf_counter() - t0
    prompts = random_prompts(args.num_prompts, args.input_len, llm.engine.model_config.vocab_size, args.seed)
    params = SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=args.output_len)
    engine = llm.engine
    stats_before = dataclasses.replace(engine.stats)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
    steps = engine.stats.steps - stats_before.steps
    host = engine.stats.host_seconds - stats_before.host_seconds
    print(f"engine: {engine.stats.summary()}")
    return dict(elapsed=elapsed, startup_seconds=startup, steps=steps, host_ms_per_step=1e3 * host / max(steps, 1),
                compilations_after_warmup=engine.num_compilations_since_warmup,
                device=str(jax.devices()[0].device_kind))


def run_transformers(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    if args.model is None or not Path(args.model).is_dir():
        raise SystemExit("--backend transformers needs --model pointing at a Hugging Face folder")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}[args.dtype]
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").eval()
    startup = time.perf_counter() - t0
    prompts = random_prompts(args.num_prompts, args.input_len, model.config.vocab_size, args.seed)
    gen = GenerationConfig(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=True,
                           temperature=1.0, top_p=1.0, top_k=0, eos_token_id=None, pad_token_id=0)
    # Its memory auto-sizing reads GPU memory: on the CPU, give it room for every sequence.
    per_seq = -(-(args.input_len + args.output_len) // args.hf_block_size)
    cb = ContinuousBatchingConfig(max_requests_per_batch=args.max_num_seqs, max_batch_tokens=args.max_num_batched_tokens,
                                  block_size=args.hf_block_size, num_blocks=per_seq * args.num_prompts + 1)
    # (not under torch.inference_mode: generate_batch runs its loop on another thread)
    model.generate_batch(inputs=prompts[:2], generation_config=gen, continuous_batching_config=cb)  # warm-up
    t0 = time.perf_counter()
    outs = model.generate_batch(inputs=prompts, generation_config=gen, continuous_batching_config=cb)
    elapsed = time.perf_counter() - t0
    lengths = [len(o.generated_tokens) for o in outs.values()]
    errors = [o.error for o in outs.values() if o.error]
    assert len(outs) == len(prompts) and all(n == args.output_len for n in lengths), (lengths[:8], errors[:2])
    return dict(elapsed=elapsed, startup_seconds=startup, torch_threads=torch.get_num_threads(), device="cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["jaxserve", "transformers"], default="jaxserve")
    p.add_argument("--model", default=None, help="HF folder or preset (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--num-kv-pages", type=int, default=None)
    p.add_argument("--attention-impl", default="auto", choices=["auto", "xla", "pallas", "reference"])
    p.add_argument("--hf-block-size", type=int, default=256, help="transformers' KV block size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    if args.backend == "transformers" and args.model is None:
        args.model = str(Path.home() / ".cache" / "jaxserve" / "models" / "SmolLM2-135M-Instruct")
    result = (run_jaxserve if args.backend == "jaxserve" else run_transformers)(args)
    n = args.num_prompts
    out_tokens = n * args.output_len
    total_tokens = n * (args.input_len + args.output_len)
    elapsed = result["elapsed"]
    print(f"Throughput: {n / elapsed:.2f} requests/s, {total_tokens / elapsed:.2f} total tokens/s, "
          f"{out_tokens / elapsed:.2f} output tokens/s")
    if args.output_json:
        record = dict(vars(args), **result, requests_per_second=n / elapsed, tokens_per_second=total_tokens / elapsed,
                      output_tokens_per_second=out_tokens / elapsed, date=str(date.today()), host=platform.node())
        Path(args.output_json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
