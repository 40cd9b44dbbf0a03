"""Runs the ragged attention kernel once per shape, for a hardware profiler (Nsight Compute) to read.

Each shape is compiled and run twice; profile the second launch (the first one warms up), one
shape per process:

    ncu --clock-control none -k regex:mosaic --launch-skip 1 --launch-count 1 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
        python3 scripts/profile_kernels.py --shapes decode:64x2048:64

Shapes: kind:BATCHxLEN:PAGE_SIZE; decode is BATCH sequences of one new token after LEN cached ones,
prefill is BATCH sequences of LEN new tokens. Llama-3.1-8B heads (32 q, 8 kv, head_dim 128), bf16.
Without ncu it prints each shape's time of one launch (not a benchmark: see bench_kernels.py).
With --trace DIR it also runs each shape --calls times under the JAX profiler and prints the
device time per call of every kernel the public function launches (the attention kernel and the
XLA ops of its wrapper: tile plan, q and output reorders).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax

from jaxserve.benchmarks.attention_batch import DT, H, K, N, make_batch
from jaxserve.benchmarks.traces import traced
from pallas_kernels import ragged_paged_attention


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="decode:64x2048:64")
    p.add_argument("--trace", default=None, help="a folder: also trace --calls launches of each shape")
    p.add_argument("--calls", type=int, default=10)
    args = p.parse_args()
    for spec in args.shapes.split(","):
        kind, size, page = spec.split(":")
        if kind not in ("decode", "prefill"):
            raise SystemExit(f"{spec}: the kind is decode or prefill")
        batch, length = (int(x) for x in size.split("x"))
        q_lens = [1] * batch if kind == "decode" else [length] * batch
        inputs = make_batch(
            jax.random.key(0),
            q_lens,
            [length] * batch,
            num_heads=N,
            num_kv_heads=K,
            head_dim=H,
            page_size=int(page),
            dtype=DT,
            pad_rows=0,
        )
        call = lambda: ragged_paged_attention(**inputs, sm_scale=H**-0.5)  # noqa: E731
        jax.block_until_ready(call())
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        elapsed = time.perf_counter() - t0
        print(f"{spec}: one launch {elapsed * 1e6:.0f} us (host clock, launch included)", flush=True)
        if args.trace:
            folder = Path(args.trace) / spec.replace(":", "_")
            lines = traced(folder, lambda: jax.block_until_ready([call() for _ in range(args.calls)]))
            for line in lines:
                if line["plane"].startswith("/device") and line["events"] >= args.calls:
                    print(
                        f"  {line['line']}: busy {1e3 * line['busy_ms'] / args.calls:.1f} us per call; "
                        + "; ".join(f"{e['name'][:50]} {1e3 * e['ms'] / args.calls:.1f} us" for e in line["top"]),
                        flush=True,
                    )


if __name__ == "__main__":
    main()
