"""Decode latency, in the manner of `vllm bench latency`: B prompts of --input-len tokens, each
generating --output-len tokens (ignore_eos, greedy), all in one batch; reports ms per output
token (per step) beside the floor measured in the same run: weight bytes / copy bandwidth.

    python scripts/bench_latency.py --model llama-3.1-8b --load-format dummy --batches 1,8,32,128
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from device_limits import copy_bandwidth  # scripts/device_limits.py


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--batches", default="1,8,32,128")
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--row-bucket-growth", type=int, default=0)
    p.add_argument("--attention-impl", default="auto")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--async-scheduling", type=int, default=1, help="0: one step at a time")
    p.add_argument(
        "--throughput-prompts",
        type=int,
        default=0,
        help="then also time N prompts of --throughput-len in / out, all at once (offline throughput)",
    )
    p.add_argument("--throughput-len", type=int, default=1024)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()

    import jax

    from jaxserve import LLM, SamplingParams

    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.perf_counter()
    llm = LLM(
        args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size,
        max_num_seqs=max(batches),
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=max(args.input_len + args.output_len, 2 * args.throughput_len) + 16,
        row_bucket_growth=args.row_bucket_growth,
        page_size=args.page_size,
        async_scheduling=bool(args.async_scheduling),
        attention_impl=args.attention_impl,
    )
    startup = time.perf_counter() - t0
    engine = llm.engine
    weight_bytes = sum(a.nbytes for a in jax.tree.leaves(engine.runner.state))
    bandwidth = copy_bandwidth()
    floor_ms = 1e3 * weight_bytes / args.tensor_parallel_size / bandwidth
    record = dict(
        vars(args),
        device=jax.devices()[0].device_kind,
        startup_seconds=startup,
        weight_bytes=weight_bytes,
        copy_bandwidth=bandwidth,
        floor_ms_per_token=floor_ms,
        date=time.strftime("%Y-%m-%d"),
        results=[],
    )
    print(
        f"floor: {weight_bytes / 1e9:.2f} GB of weights / {args.tensor_parallel_size} devices / "
        f"{bandwidth / 1e12:.2f} TB/s copy = {floor_ms:.2f} ms per step"
    )
    rng = np.random.default_rng(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    for b in batches:
        prompts = [{"prompt_token_ids": rng.integers(100, vocab - 100, args.input_len).tolist()} for _ in range(b)]
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        before = dataclasses.replace(engine.stats)
        for rid in range(b):
            engine.add_request(f"b{b}-{rid}", prompts[rid], params)
        step_times, t_all = [], time.perf_counter()
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            engine.step()
            if engine.last_step is not None and engine.last_step.num_tokens == b:  # a pure decode step
                step_times.append(time.perf_counter() - t)
        total = time.perf_counter() - t_all
        ms = 1e3 * float(np.median(step_times))
        host = 1e3 * (engine.stats.host_seconds - before.host_seconds) / max(engine.stats.steps - before.steps, 1)
        record["results"].append(
            dict(
                batch=b,
                ms_per_token=ms,
                x_floor=ms / floor_ms,
                total_seconds=total,
                ms_per_token_whole_request=1e3 * total / args.output_len,
                host_ms_per_step=host,
            )
        )
        print(
            f"batch {b:>4}: {ms:.2f} ms per output token (median decode step), {ms / floor_ms:.2f}x the floor; "
            f"whole request {total:.2f} s ({1e3 * total / args.output_len:.2f} ms per output token, prefill "
            f"included); host work {host:.2f} ms/step (this batch's steps)"
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
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
