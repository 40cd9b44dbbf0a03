"""Plot of fp8 against bf16 KV pages from one device call's results:

    python scripts/plot_kv_dtypes.py docs/results/2026-12-07-fp8/session10/callC \\
        --buckets docs/results/2026-12-07-fp8/session10/callD/b/decode_buckets.json --out docs/img

kv_dtype_decode.png. Left: bench_latency's ms per output token at each decode batch, for each KV
dtype (latency_fp8.json, latency_auto.json), and each run's weight-read floor. Right (with
--buckets, bench_decode_buckets' --padded-batches cases): the attention kernel's time against
the KV splits forced on it, one line per (live rows, pages).
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
    batches = [r["batch"] for r in runs["auto"]["results"]]
    width = 0.38
    for i, (kv, run) in enumerate(runs.items()):
        xs = [j + (i - 0.5) * width for j in range(len(batches))]
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
        ax = axes[0][1]
        for live in sorted({c["live_rows"] for c in padded}):
            for pages in ("bf16", "fp8_e4m3"):
                cases = [c for c in padded if c["live_rows"] == live and c["pages"] == pages]
                auto = [c for c in cases if c["splits"] == "auto"]
                forced = sorted((c["splits"], c["us"]) for c in cases if c["splits"] != "auto")
                (line,) = ax.plot(*zip(*forced), "o-", label=f"{live} live of {cases[0]['bucket']} rows, {pages}")
                if auto:
                    ax.axhline(auto[0]["us"], color=line.get_color(), linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV splits forced (dotted: as picked for all rows, 1 split)")
        ax.set_ylabel("attention kernel, us")
        ax.set_title(f"padded decode buckets, kv {padded[0]['kv_len']}", fontsize=10)
        ax.legend(fontsize=8)

    fig.suptitle(f"{first['device']}, {first['date']}", fontsize=10)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "kv_dtype_decode.png", dpi=110)
    print(f"wrote {args.out / 'kv_dtype_decode.png'}")


if __name__ == "__main__":
    main()
