"""Latency with `vllm bench latency`'s flags and result lines: --batch-size prompts of --input-len
random token ids, each generating --output-len tokens (ignore_eos, temperature 1.0, --n samples),
generated together --num-iters-warmup times untimed, then --num-iters times timed; prints
"Avg latency: X seconds" and the 10/25/50/75/90/99% percentiles. The engine flags are `jaxserve
serve`'s (jaxserve/engine_args.py); on a CPU without plan flags the plan is the small one.

Beyond vLLM: --batches runs several batch sizes on one engine, and for each the decode step is
timed alone (ms per output token, the median pure-decode step) beside the floor measured in the
same run: weight bytes / copy bandwidth. --throughput-prompts also times N prompts of
--throughput-len in / out, all at once.

    python scripts/bench_latency.py --input-len 32 --output-len 128 --batch-size 8
    python scripts/bench_latency.py --model llama-3.1-8b --load-format dummy --dtype bfloat16 \
        --input-len 128 --output-len 256 --batches 1,8,32,128 --max-num-batched-tokens 1024 \
        --row-bucket-growth 0 --num-iters-warmup 1 --num-iters 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from jaxserve.engine_args import add_engine_args, engine_kwargs, multi_gpu_environment

PERCENTAGES = (10, 25, 50, 75, 90, 99)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--num-iters-warmup", type=int, default=10)
    p.add_argument("--num-iters", type=int, default=30)
    p.add_argument("--output-json", default=None)
    p.add_argument("--batches", default=None, help="batch sizes, comma-separated (default: --batch-size)")
    p.add_argument(
        "--throughput-prompts",
        type=int,
        default=0,
        help="then also time N prompts of --throughput-len in / out, all at once (offline throughput)",
    )
    p.add_argument("--throughput-len", type=int, default=1024)
    add_engine_args(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    # transformers advises at import that PyTorch is absent; jaxserve never needs it.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = make_parser().parse_args(argv)
    multi_gpu_environment(args.tensor_parallel_size, os.environ)  # NCCL_NVLS_ENABLE=0 at tp > 1

    from jaxserve.benchmarks.device_limits import copy_bandwidth

    # Before JAX starts its GPU client, which takes 95% of the memory (an 80 GB card has no room after).
    bandwidth = copy_bandwidth()

    import jax

    from jaxserve import LLM, SamplingParams

    batches = [int(b) for b in (args.batches or str(args.batch_size)).split(",")]
    kwargs = engine_kwargs(args)
    if jax.default_backend() != "cpu" or any(k in kwargs for k in ("max_num_seqs", "max_num_batched_tokens")):
        kwargs.setdefault("max_num_seqs", max(batches) * args.n)
    if "max_model_len" not in kwargs:
        kwargs["max_model_len"] = max(args.input_len + args.output_len, 2 * args.throughput_len) + 16
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - t0
    engine = llm.engine
    tp = engine.config.tensor_parallel_size
    weight_bytes = sum(a.nbytes for a in jax.tree.leaves(engine.runner.state))
    floor_ms = 1e3 * weight_bytes / tp / bandwidth
    record = dict(
        {k: v for k, v in vars(args).items() if not k.startswith("_")},
        device=jax.devices()[0].device_kind,
        startup_seconds=startup,
        weight_bytes=weight_bytes,
        copy_bandwidth=bandwidth,
        floor_ms_per_token=floor_ms,
        date=time.strftime("%Y-%m-%d"),
        results=[],
    )
    print(
        f"floor: {weight_bytes / 1e9:.2f} GB of weights / {tp} devices / {bandwidth / 1e12:.2f} TB/s copy = "
        f"{floor_ms:.2f} ms per step"
    )
    rng = np.random.default_rng(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(n=args.n, temperature=1.0, top_p=1.0, max_tokens=args.output_len, ignore_eos=True)
    for b in batches:
        prompts = [{"prompt_token_ids": rng.integers(100, vocab - 100, args.input_len).tolist()} for _ in range(b)]
        for _ in range(args.num_iters_warmup):
            llm.generate(prompts, params, use_tqdm=False)
        latencies = []
        for _ in range(args.num_iters):
            t = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            latencies.append(time.perf_counter() - t)
        # The decode step alone: the same batch stepped by hand, timing the steps that only decode.
        before = dataclasses.replace(engine.stats)
        for rid in range(b):
            engine.add_request(f"b{b}-{rid}", prompts[rid], params)
        step_times = []
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            engine.step()
            if engine.last_step is not None and engine.last_step.num_tokens == b * args.n:
                step_times.append(time.perf_counter() - t)
        ms = 1e3 * float(np.median(step_times)) if step_times else float("nan")
        host = 1e3 * (engine.stats.host_seconds - before.host_seconds) / max(engine.stats.steps - before.steps, 1)
        percentiles = dict(zip(PERCENTAGES, np.percentile(latencies, PERCENTAGES).tolist())) if latencies else {}
        avg = float(np.mean(latencies)) if latencies else float("nan")
        record["results"].append(
            dict(
                batch=b,
                avg_latency=avg,
                latencies=latencies,
                percentiles=percentiles,
                ms_per_token=ms,
                x_floor=ms / floor_ms,
                host_ms_per_step=host,
            )
        )
        if len(batches) > 1:
            print(f"batch size {b}:")
        print(f"Avg latency: {avg} seconds")
        for pct, value in percentiles.items():
            print(f"{pct}% percentile latency: {value} seconds")
        print(
            f"decode step: {ms:.2f} ms per output token (median), {ms / floor_ms:.2f}x the floor; host work "
            f"{host:.2f} ms/step"
        )
    print(engine.stats.summary())
    if args.throughput_prompts:
        n, length = args.throughput_prompts, args.throughput_len
        prompts = [{"prompt_token_ids": rng.integers(100, vocab - 100, length).tolist()} for _ in range(n)]
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=length, ignore_eos=True), use_tqdm=False)
        elapsed = time.perf_counter() - t0
        record["throughput"] = dict(
            prompts=n, input_len=length, output_len=length, seconds=elapsed, output_tokens_per_s=n * length / elapsed
        )
        print(
            f"throughput: {n} x {length} in / {length} out: {n * length / elapsed:.0f} output tokens/s "
            f"({elapsed:.1f} s); {engine.stats.summary()}"
        )
    if len(batches) == 1:  # vLLM's keys, for a script that reads its JSON
        first = record["results"][0]
        record.update(avg_latency=first["avg_latency"], latencies=first["latencies"], percentiles=first["percentiles"])
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


if __name__ == "__main__":
    main()
