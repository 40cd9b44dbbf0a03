"""Decode at the engine's small token buckets: the config each bucket shape picks (`default_config`)
against the other config, on bf16 and fp8 pages, checked against the reference first. One call:

    PYTHONUNBUFFERED=1 python3 scripts/bench_decode_buckets.py --out $OUT

The engine pads a step to its smallest token bucket (16 by default): decode at batch 1 runs as
T = 16 tokens in R = 1 row. Such a bucket is decode-shaped (T * G <= 128: DECODE_CONFIG or
FP8_DECODE_CONFIG, with KV splits that fill the SMs); before 2026-12-07 it counted as prefill-shaped
(T > 2 R) and ran PREFILL_CONFIG without KV splits, the config timed beside it here. Cases (Llama-3.1-8B heads: 32 q, 8 kv, head_dim
128; pages of 16; the page table as wide as --max-model-len): one live token at each --kv-lens, and a
16-token chunk (what the decode config costs a short prefill). Prints one line per case, then the
copy bandwidth; every number goes to OUT/decode_buckets.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxserve.benchmarks.attention_batch import DT, H, K, N, make_batch
from jaxserve.benchmarks.device_limits import copy_bandwidth
from jaxserve.benchmarks.kernel_timing import rel_err, time_chained
from pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.kv_quant import quantize
from pallas_kernels.ragged_paged_attention_config import (
    DECODE_CONFIG,
    FP8_DECODE_CONFIG,
    PREFILL_CONFIG,
    default_config,
)

PAGE = 16


def cases(kv_lens: list[int], bucket: int):
    """(q_len, kv_len, page kinds): one live token at each kv length, then a bucket-long chunk."""
    return [(1, kv, ("bf16", "fp8_e4m3")) for kv in kv_lens] + [(bucket, kv_lens[0], ("bf16",))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--kv-lens", default="1024,2048")
    p.add_argument("--bucket", type=int, default=16, help="the token bucket (the engine's min_token_bucket)")
    p.add_argument("--max-model-len", type=int, default=2064, help="sets the page table's width")
    p.add_argument("--calls", type=int, default=32)
    p.add_argument("--interpret", action="store_true", help="the kernel in interpret mode: a CPU smoke run")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Before JAX allocates: the copy is timed with torch, which needs room that JAX's pool would hold.
    bandwidth = copy_bandwidth()
    rows = []
    width = -(-args.max_model_len // PAGE)
    for q_len, kv_len, kinds in cases([int(x) for x in args.kv_lens.split(",")], args.bucket):
        base = make_batch(
            jax.random.key(kv_len + q_len),
            [q_len],
            [kv_len],
            num_heads=N,
            num_kv_heads=K,
            head_dim=H,
            page_size=PAGE,
            dtype=DT,
            pad_rows=0,
            pad_tokens=args.bucket - q_len,
        )
        base["page_table"] = jnp.pad(base["page_table"], ((0, 0), (0, width - base["page_table"].shape[1])))
        names = list(base)
        for kind in kinds:
            batch = dict(base)
            if kind != "bf16":
                batch["k_pages"] = quantize(base["k_pages"], 1.0, jnp.float8_e4m3fn)
                batch["v_pages"] = quantize(base["v_pages"], 1.0, jnp.float8_e4m3fn)
            picked = default_config(args.bucket, 1, fp8_pages=kind != "bf16", group=N // K)
            decode = FP8_DECODE_CONFIG if kind != "bf16" else DECODE_CONFIG
            # PREFILL_CONFIG as the engine ran it before: prefill-shaped, so no KV splits
            prefill = dataclasses.replace(PREFILL_CONFIG, kv_splits=1)
            ref = ragged_paged_attention_reference(**batch, sm_scale=H**-0.5)[:q_len]
            for name, config in (("decode_config", decode), ("prefill_config", prefill)):

                def fn(*a, config=config):
                    return ragged_paged_attention(*a, sm_scale=H**-0.5, config=config, interpret=args.interpret)

                row = dict(q_len=q_len, kv_len=kv_len, pages=kind, config=name, picked=config == picked)
                row["rel_err"] = rel_err(fn(*[batch[n] for n in names])[:q_len], ref)
                row["us"] = 1e6 * time_chained(fn, [batch[n] for n in names], names.index("kv_lens"), args.calls)
                rows.append(row)
                print(row, flush=True)
    record = dict(device=jax.devices()[0].device_kind, copy_bandwidth=bandwidth, cases=rows)
    print(f"{record['device']}: copy bandwidth {record['copy_bandwidth'] / 1e12:.2f} TB/s", flush=True)
    (out / "decode_buckets.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
