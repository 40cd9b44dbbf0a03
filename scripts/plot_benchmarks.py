"""Plots of one day's GPU benchmark results (the JSON files the bench scripts wrote):

    python scripts/plot_benchmarks.py docs/results/2026-11-21 --out docs/img

throughput_latency.png: output tokens/s against ms per output token of a request, for the decode
batches of bench_latency, the request rates of bench_serving and the offline bench_throughput
run, with the weight-read floor. step_breakdown.png: per decode batch, the measured step time
beside the floor and the host's work per step. step_kernels.png (when the folder holds
profile_step's profile_h200.json): per decode batch and for an idle prompt's prefill, the device
time of a step split into matmuls, attention and the other kernels, and the part of the period
the device sat idle.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(folder: Path, name: str):
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/img"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lat = load(args.folder, "latency_h200.json")
    tp = load(args.folder, "throughput_h200.json")
    device, date = lat["device"], lat["date"]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = lat["results"]
    ax.plot(
        [1e3 * r["batch"] / r["ms_per_token"] for r in rows],
        [r["ms_per_token"] for r in rows],
        "o-",
        label="bench_latency: decode batch of B (1024-token budget)",
    )
    for r in rows:
        ax.annotate(
            f"B={r['batch']}",
            (1e3 * r["batch"] / r["ms_per_token"], r["ms_per_token"]),
            textcoords="offset points",
            xytext=(5, -10),
            fontsize=8,
        )
    serving = [(rate, load(args.folder, f"serving_h200_rate_{rate}.json")) for rate in ("1", "4", "16", "inf")]
    serving = [(rate, s) for rate, s in serving if s]
    if serving:
        xs = [s["output_tokens_per_second"] for _, s in serving]
        ys = [s["e2e_ms"]["p50"] / s["output_len"] for _, s in serving]
        ax.plot(xs, ys, "s--", label="bench_serving 1024 in / 128 out: p50 request time / 128")
        for (rate, _), x, y in zip(serving, xs, ys):
            ax.annotate(f"{rate} req/s", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if tp:
        for r in tp["results"]:
            if r["num_prompts"] >= 500:
                period = 1e3 * r["elapsed"] / r["steps"]
                ax.plot(
                    [r["output_tokens_per_second"]],
                    [period],
                    "^",
                    markersize=9,
                    label=f"bench_throughput {r['input_len']}:{r['output_len']} x {r['num_prompts']} (ms per step)",
                )
    ax.axhline(lat["floor_ms_per_token"], color="gray", linestyle=":", label="floor: weights / copy bandwidth")
    ax.set_xscale("log")
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("ms per output token of a request")
    ax.set_title(f"Llama-3.1-8B dummy bf16, {device}, {date}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "throughput_latency.png", dpi=130)

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"B={r['batch']}" for r in rows]
    xs = range(len(rows))
    w = 0.27
    ax.bar([x - w for x in xs], [lat["floor_ms_per_token"]] * len(rows), w, label="floor (weights / copy bandwidth)")
    ax.bar(list(xs), [r["ms_per_token"] for r in rows], w, label="measured decode step (median)")
    ax.bar(
        [x + w for x in xs],
        [r["host_ms_per_step"] for r in rows],
        w,
        label="host work per step (mean over the runs up to this batch)",
    )
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("ms")
    ax.set_title(f"Decode step time, Llama-3.1-8B dummy bf16, {device}, {date}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "step_breakdown.png", dpi=130)
    print(f"wrote {args.out / 'throughput_latency.png'} and {args.out / 'step_breakdown.png'}")
    profile = load(args.folder, "profile_h200.json")
    if profile:
        plot_step_kernels(profile, args.out / "step_kernels.png")


def kernel_split(trace: list[dict], steps: int) -> dict[str, float]:
    """ms per step of the compute stream: matmuls, the Mosaic GPU kernels (attention and the K/V
    writer), the rest. The trace summary keeps each stream's 12 costliest kernel names; the others
    count as rest, so rest is an upper bound."""
    stream = max((line for line in trace if line["plane"].startswith("/device")), key=lambda line: line["busy_ms"])
    matmul = sum(e["ms"] for e in stream["top"] if "gemm" in e["name"] or "nvjet" in e["name"])
    attention = sum(e["ms"] for e in stream["top"] if "mosaic" in e["name"])
    return dict(
        matmuls=matmul / steps, attention=attention / steps, other=(stream["busy_ms"] - matmul - attention) / steps
    )


def plot_step_kernels(profile: dict, path: Path) -> None:
    bars = []
    for row in profile["batches"]:
        split = kernel_split(row["trace"], profile["args"]["trace_steps"])
        bars.append((f"decode B={row['batch']}", split, row["period_ms"]))
    for row in profile.get("prefill", []):  # one request: one step, then its first token
        bars.append((f"prefill {row['prompt_len']}", kernel_split(row["trace"], 1), row["first_token_ms"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = list(range(len(bars)))
    bottom = [0.0] * len(bars)
    for part, label, color in (
        ("matmuls", "matmuls", "tab:blue"),
        ("attention", "attention + K/V write", "tab:orange"),
        ("other", "other kernels", "tab:gray"),
    ):
        heights = [split[part] for _, split, _ in bars]
        ax.bar(xs, heights, 0.6, bottom=bottom, color=color, label=f"{label} (device)")
        bottom = [b + h for b, h in zip(bottom, heights)]
    idle = [max(period - b, 0.0) for (_, _, period), b in zip(bars, bottom)]
    ax.bar(
        xs,
        idle,
        0.6,
        bottom=bottom,
        color="white",
        edgecolor="black",
        hatch="//",
        label="device idle (period, or time to first token, minus kernels)",
    )
    ax.set_xticks(xs, [label for label, _, _ in bars], fontsize=8)
    ax.set_ylabel("ms per step")
    ax.set_title(
        f"Where a step's time goes (JAX profiler trace), {profile['args']['model']} dummy,\n"
        f"{profile['device']}, {profile['date']}, prompts of {profile['args']['input_len']} tokens",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
