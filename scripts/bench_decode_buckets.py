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

--padded-batches B[/R],...: decode as the engine runs it with one row bucket per token bucket
(--row-bucket-growth 0): B live rows of one token in a bucket of T = R = max(--bucket, B rounded up
to a power of two) rows (or R rows, given), the rest padding, at the first of --kv-lens. The KV
splits are static and chosen for R rows, live or not; each case times the picked config at the
count it picks (`picked`: true) and at each of --splits, on bf16 and fp8 pages, so the split count
a half-empty bucket needs can be read off. --dynamic adds the picked config with dynamic_splits
(`splits`: "dynamic"), the count picked on the device from the live rows. Times are of the whole
call (the wrapper's q gather and split combine included), as bench_kernels times it.

--both-qk: on fp8 pages, each decode config both with Q.K^T in fp8 (`fp8_qk`: q quantized to e4m3,
K multiplied from the ring, only V widened; FP8_DECODE_CONFIG's since 2026-12-07) and in 16 bits (K
widened too): config `decode_config_16bit_qk` in the cases above, rows with `fp8_qk` false in the
--padded-batches cases.
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
    PREFILL_CONFIG,
    default_config,
    fp8_decode_config,
    kv_splits_for,
    num_sms,
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
    p.add_argument(
        "--padded-batches", default="", help="live decode rows [/ bucket rows] in a padded bucket, comma-separated"
    )
    p.add_argument("--splits", default="1,4,16", help="KV splits forced in the --padded-batches cases")
    p.add_argument("--dynamic", action="store_true", help="--padded-batches: also time dynamic_splits")
    p.add_argument("--both-qk", action="store_true", help="fp8 pages: also time the decode configs with 16-bit QK")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Before JAX allocates: the copy is timed with torch, which needs room that JAX's pool would hold.
    bandwidth = copy_bandwidth()
    rows = []
    width = -(-args.max_model_len // PAGE)
    for q_len, kv_len, kinds in cases([int(x) for x in args.kv_lens.split(",")], args.bucket):
        base = engine_batch(kv_len + q_len, [q_len], kv_len, args.bucket, 1, width)
        for kind in kinds:
            batch = with_pages(base, kind)
            picked = default_config(args.bucket, 1, group=N // K, page_size=PAGE, fp8_pages=kind != "bf16")
            decode = fp8_decode_config(PAGE) if kind != "bf16" else DECODE_CONFIG
            # PREFILL_CONFIG as the engine ran it before: prefill-shaped, so no KV splits
            prefill = dataclasses.replace(PREFILL_CONFIG, kv_splits=1)
            ref = reference(batch, q_len)
            configs = [("decode_config", decode), ("prefill_config", prefill)]
            if args.both_qk and kind != "bf16":
                configs.append(("decode_config_16bit_qk", dataclasses.replace(decode, fp8_qk=False)))
            for name, config in configs:
                row = dict(q_len=q_len, kv_len=kv_len, pages=kind, config=name, picked=config == picked)
                rows.append(timed(row, batch, config, ref, args))
    for case in [x for x in args.padded_batches.split(",") if x]:
        live, _, bucket = case.partition("/")
        bucket = int(bucket) if bucket else max(args.bucket, 1 << (int(live) - 1).bit_length())
        rows += padded_cases(int(live), bucket, int(args.kv_lens.split(",")[0]), args, width)
    record = dict(device=jax.devices()[0].device_kind, copy_bandwidth=bandwidth, cases=rows)
    print(f"{record['device']}: copy bandwidth {record['copy_bandwidth'] / 1e12:.2f} TB/s", flush=True)
    (out / "decode_buckets.json").write_text(json.dumps(record, indent=1))


def engine_batch(seed: int, q_lens: list[int], kv_len: int, num_tokens: int, num_rows: int, width: int) -> dict:
    """A batch padded as the engine pads a step: num_tokens tokens, num_rows rows (live ones first),
    a page table `width` pages wide."""
    batch = make_batch(
        jax.random.key(seed),
        q_lens,
        [kv_len] * len(q_lens),
        num_heads=N,
        num_kv_heads=K,
        head_dim=H,
        page_size=PAGE,
        dtype=DT,
        pad_rows=num_rows - len(q_lens),
        pad_tokens=num_tokens - sum(q_lens),
    )
    batch["page_table"] = jnp.pad(batch["page_table"], ((0, 0), (0, width - batch["page_table"].shape[1])))
    return batch


def with_pages(batch: dict, kind: str) -> dict:
    """The batch with its K/V pages as `kind`: "bf16" as made, "fp8_e4m3" quantized (scales 1.0)."""
    if kind == "bf16":
        return batch
    fp8 = {n: quantize(batch[n], 1.0, jnp.float8_e4m3fn) for n in ("k_pages", "v_pages")}
    return {**batch, **fp8}


def reference(batch: dict, num_live: int):
    """The reference attention of the batch's first num_live (live) tokens."""
    return ragged_paged_attention_reference(**batch, sm_scale=H**-0.5)[:num_live]


def timed(row: dict, batch: dict, config, ref, args) -> dict:
    """row with the call's error against `ref` (the live tokens' reference) and its time."""

    def fn(*a):
        return ragged_paged_attention(*a, sm_scale=H**-0.5, config=config, interpret=args.interpret)

    names = list(batch)
    row["rel_err"] = rel_err(fn(*batch.values())[: ref.shape[0]], ref)
    row["us"] = 1e6 * time_chained(fn, list(batch.values()), names.index("kv_lens"), args.calls)
    print(row, flush=True)
    return row


def padded_cases(live: int, bucket: int, kv_len: int, args, width: int) -> list[dict]:
    """`live` one-token rows in a bucket of T = R = `bucket` rows (the rest padding), the picked
    config at the split count it picks for R rows (`picked`) and at each forced count, fewest first,
    then (--dynamic) with the count picked on the device."""
    if not 1 <= live <= bucket:
        raise SystemExit(f"--padded-batches: {live} live rows do not fit a bucket of {bucket}")
    base = engine_batch(live, [1] * live, kv_len, bucket, bucket, width)
    rows = []
    for kind in ("bf16", "fp8_e4m3"):
        batch = with_pages(base, kind)
        picked = default_config(bucket, bucket, group=N // K, page_size=PAGE, fp8_pages=kind != "bf16")
        # the count the wrapper picks (kv_splits None), timed once among the forced ones
        auto = kv_splits_for(picked, bucket, bucket, K, width, PAGE, num_sms(args.interpret), group=N // K)
        ref = reference(batch, live)
        forced = sorted({auto, *(int(x) for x in args.splits.split(","))})
        configs = {(splits, False): dataclasses.replace(picked, kv_splits=splits) for splits in forced}
        if args.dynamic:
            configs["dynamic", False] = dataclasses.replace(picked, dynamic_splits=True)
        if args.both_qk and kind != "bf16":  # each of them again with QK in 16 bits
            configs |= {(s, True): dataclasses.replace(c, fp8_qk=False) for (s, _), c in list(configs.items())}
        for (splits, toggled), config in configs.items():
            row = dict(live_rows=live, bucket=bucket, kv_len=kv_len, pages=kind, splits=splits)
            row |= dict(picked=splits == auto and not toggled, fp8_qk=config.fp8_qk)
            rows.append(timed(row, batch, config, ref, args))
    return rows


if __name__ == "__main__":
    main()
