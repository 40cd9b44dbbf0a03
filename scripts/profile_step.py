"""Where a decode step's time goes, at several batch sizes, in one GPU-machine call:

  1. engine: B requests decoding; per step its period, host work, staging, the compiled call
     (launch) alone, and the wait for the device (medians over --steps steps);
  2. device alone: the same staged step launched back to back with nothing else on the host, so
     its period is the device's time for the step (and the launch time shows whether the runtime
     blocks the caller);
  3. trace: a JAX profiler trace of a few engine steps, summarised per plane and line (GPU stream
     busy time, kernel count, the longest host events), written as JSON beside the raw trace.

    python scripts/profile_step.py --model llama-3.1-8b --batches 1,32,128 --out $OUT

Run it once per XLA_FLAGS variant to compare runtime settings (e.g. command buffers off), or per
--kv-cache-dtype to see what fp8 pages add to a step (--top 400 keeps every kernel's name).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from jaxserve.benchmarks.traces import traced
from jaxserve.engine_args import add_engine_args, engine_kwargs, multi_gpu_environment


def print_trace(lines: list[dict], keep) -> None:
    for line in filter(keep, lines):
        print(
            f"   {line['plane']} | {line['line']}: {line['events']} events, busy {line['busy_ms']:.2f} of "
            f"{line['span_ms']:.2f} ms; top: "
            + "; ".join(f"{e['name'][:60]} x{e['count']} {e['ms']:.2f}" for e in line["top"][:8]),
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,32,128")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--trace-steps", type=int, default=6)
    p.add_argument(
        "--prefill-lens", default="", help="also time one idle request of each prompt length to its first token"
    )
    p.add_argument("--label", default=os.environ.get("XLA_FLAGS", "") or "default")
    p.add_argument("--top", type=int, default=12, help="names kept per trace line in the JSON (by time)")
    p.add_argument("--out", default=".")
    defaults = dict(model="llama-3.1-8b", load_format="dummy", max_num_batched_tokens=1024, row_bucket_growth=0)
    add_engine_args(p, defaults=defaults)
    args = p.parse_args()
    multi_gpu_environment(args.tensor_parallel_size, os.environ)  # NCCL_NVLS_ENABLE=0 at tp > 1

    import jax

    from jaxserve import LLM, SamplingParams

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",") if b]
    prefill_lens = [int(n) for n in args.prefill_lens.split(",") if n]
    t0 = time.perf_counter()
    kwargs = engine_kwargs(args)
    kwargs.setdefault("max_num_seqs", max(batches, default=1))
    kwargs.setdefault(
        "max_model_len",
        max(
            [
                args.input_len
                + 2 * args.steps
                + args.trace_steps
                + 96
                + max((-(-b * args.input_len // max(args.max_num_batched_tokens - b, 1)) for b in batches), default=0),
                *(n + 16 for n in prefill_lens),
            ]
        ),
    )
    llm = LLM(**kwargs)
    record = dict(
        label=args.label,
        device=jax.devices()[0].device_kind,
        date=time.strftime("%Y-%m-%d"),
        startup_seconds=time.perf_counter() - t0,
        args={k: v for k, v in vars(args).items() if not k.startswith("_")},
        batches=[],
    )
    print(f"[{args.label}] start-up {record['startup_seconds']:.1f} s", flush=True)
    engine, runner = llm.engine, llm.engine.runner
    rng = np.random.default_rng(0)
    vocab = engine.model_config.vocab_size
    staged = []  # the last staged input buffer, to relaunch alone
    stage = runner._stage

    def keep_last(output, t, r, changes=()):
        packed, step = stage(output, t, r, changes)
        staged[:] = [(packed, t, r, step.needs_sort)]
        return packed, step

    runner._stage = keep_last
    ms = lambda xs: round(1e3 * float(np.median(xs)), 3)  # noqa: E731

    def drain() -> None:
        while engine.has_unfinished_requests():
            engine.step()

    for b in batches:
        # Sequences prefilled first decode while the rest prefill: enough tokens that all still run
        # together afterwards.
        prefill_steps = -(-b * args.input_len // max(args.max_num_batched_tokens - b, 1))  # decode takes b a step
        params = SamplingParams(
            temperature=0, max_tokens=prefill_steps + 2 * args.steps + args.trace_steps + 32, ignore_eos=True
        )
        for i in range(b):
            engine.add_request(
                f"b{b}-{i}", {"prompt_token_ids": rng.integers(100, vocab - 100, args.input_len).tolist()}, params
            )
        while engine.last_step is None or engine.last_step.num_tokens != b:  # through the prefill
            if not engine.has_unfinished_requests():
                raise RuntimeError(f"batch {b} never decoded all together")
            engine.step()
        stats = []
        for _ in range(args.steps):
            engine.step()
            stats.append(engine.last_step)
        row = dict(
            batch=b,
            period_ms=ms([s.step_seconds for s in stats]),
            host_ms=ms([s.host_seconds for s in stats]),
            stage_and_launch_ms=ms([s.stage_seconds for s in stats]),
            launch_ms=ms([s.launch_seconds for s in stats]),
            wait_ms=ms([s.wait_seconds for s in stats]),
        )

        # The device alone: the last staged step relaunched back to back (it rewrites the same
        # K/V positions; the tokens are random weights' anyway).
        packed, t, r, full = staged[-1]
        launches, sampled = [], None
        jax.block_until_ready(runner._run(packed, t, r, full))
        start = time.perf_counter()
        for _ in range(args.steps):
            s0 = time.perf_counter()
            sampled, _ = runner._run(packed, t, r, full)
            launches.append(time.perf_counter() - s0)
        jax.block_until_ready(sampled)
        row.update(
            device_alone_ms=round(1e3 * (time.perf_counter() - start) / args.steps, 3),
            device_alone_launch_ms=ms(launches),
            bucket=[t, r],
        )

        row["trace"] = traced(out / f"trace_b{b}", lambda: [engine.step() for _ in range(args.trace_steps)], args.top)
        for i in range(b):
            engine.abort_request(f"b{b}-{i}")
        drain()
        record["batches"].append(row)
        print(
            f"[{args.label}] batch {b}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k.endswith("_ms")),
            flush=True,
        )
        print_trace(
            row["trace"],
            lambda line: (
                line["plane"].startswith("/device")
                or line["line"] == "python"
                or "Execute" in json.dumps(line["top"][:3])
            ),
        )
    record["prefill"] = []
    for n in prefill_lens:  # an idle engine: one request, time to its first token
        prompt = {"prompt_token_ids": rng.integers(100, vocab - 100, n).tolist()}
        first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

        def first_token(rid: str) -> None:
            engine.add_request(rid, prompt, first)
            drain()

        times = []
        for rep in range(6):
            t0 = time.perf_counter()
            first_token(f"p{n}-{rep}")
            times.append(time.perf_counter() - t0)
        row = dict(
            prompt_len=n,
            first_token_ms=ms(times[1:]),
            trace=traced(out / f"trace_prefill{n}", lambda: first_token(f"p{n}-trace"), args.top),
        )
        record["prefill"].append(row)
        print(f"[{args.label}] prompt {n}: first token after {row['first_token_ms']} ms (median, engine.step calls)")
        print_trace(row["trace"], lambda line: line["plane"].startswith("/device") and line["events"] > 20)
    name = "".join(c if c.isalnum() else "_" for c in args.label)[:60]
    (out / f"profile_{name}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
