"""Plot of fp8 against bf16 KV pages from one device call's results:

    python scripts/plot_kv_dtypes.py docs/results/2026-12-07-fp8/session10/callC \\
        --buckets docs/results/2026-12-07-fp8/session10/callD/b/decode_buckets.json --out docs/img

kv_dtype_decode.png. Left: bench_latency's ms per output token at each decode batch, for each KV
dtype (latency_fp8.json, latency_auto.json), and each run's weight-read floor. Right (with
--buckets, bench_decode_buckets' --padded-batches cases): the attention call's time against the
KV splits, one line per (live rows, bucket rows, pages), the count the kernel picks marked
(--dynamic cases, counted on the device: a dash-dot line).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DTYPES = {"auto": "bf16 pages", "fp8": "fp8 e4m3 pages"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="holds latency_fp8.json and latency_auto.json")
    p.add_argument("--buckets", type=Path, help="bench_decode_buckets' decode_buckets.json")
    p.add_argument("--out", type=Path, default=Path("docs/img"))
    args = p.parse_args()
    runs = {kv: json.loads((args.folder / f"latency_{kv}.json").read_text()) for kv in DTYPES}
    fig, axes = plt.subplots(1, 2 if args.buckets else 1, figsize=(12 if args.buckets else 6, 4.5), squeeze=False)

    ax = axes[0][0]
    batches = sorted({r["batch"] for run in runs.values() for r in run["results"]})
    width = 0.38
    for i, (kv, run) in enumerate(runs.items()):
        xs = [batches.index(r["batch"]) + (i - 0.5) * width for r in run["results"]]
        ys = [r["ms_per_token"] for r in run["results"]]
        ax.bar(xs, ys, width, label=f"{DTYPES[kv]} (floor {run['floor_ms_per_token']:.2f} ms)")
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.2f}", (x, y), ha="center", va="bottom", fontsize=8)
    floor = min(run["floor_ms_per_token"] for run in runs.values())
    ax.axhline(floor, color="gray", linestyle="--", linewidth=1, label="weight-read floor")
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("ms per output token (median decode step)")
    first = runs["auto"]
    ax.set_title(f"Llama-3.1-8B decode, {first['input_len']}-token prompts", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")

    if args.buckets:
        record = json.loads(args.buckets.read_text())
        padded = [c for c in record["cases"] if "live_rows" in c]
        if not padded:
            raise SystemExit(f"{args.buckets} holds no --padded-batches cases")
        ax = axes[0][1]

        def group_of(c):  # bench_decode_buckets rows with and without fp8_qk: lines of their own
            return c["live_rows"], c["bucket"], c["pages"], c.get("fp8_qk", False)

        for live, bucket, pages, fp8_qk in sorted({group_of(c) for c in padded}):
            cases = [c for c in padded if group_of(c) == (live, bucket, pages, fp8_qk)]
            timed = sorted((c["splits"], c["us"]) for c in cases if isinstance(c["splits"], int))
            label = f"{live} live of {bucket} rows, {pages}" + (", QK in fp8" if fp8_qk else "")
            (line,) = ax.plot(*zip(*timed), "o-", label=label)
            for c in cases:  # the count the kernel picks: a star (older files: a dotted line, count not recorded)
                if c["splits"] in ("auto", "dynamic"):  # no count on the axis: a level
                    style = ":" if c["splits"] == "auto" else "-."
                    ax.axhline(c["us"], color=line.get_color(), linestyle=style, linewidth=1)
                elif c.get("picked"):
                    ax.plot([c["splits"]], [c["us"]], "*", markersize=14, color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV splits (star or dotted: picked for the bucket's rows; dash-dot: dynamic)")
        ax.set_ylabel("attention call (kernel, q gather, combine), us")
        ax.set_title(f"padded decode buckets, kv {padded[0]['kv_len']}", fontsize=10)
        ax.legend(fontsize=8)

    fig.suptitle(f"{first['device']}, {first['date']}", fontsize=10)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "kv_dtype_decode.png", dpi=110)
    print(f"wrote {args.out / 'kv_dtype_decode.png'}")


if __name__ == "__main__":
    main()
