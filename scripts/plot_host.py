"""Host work per step against decode rows, from bench_host's --output-json files: two sets of runs
(before and after a change), each drawn as the median over its runs with their range, beside
issue 13's goals (1.0 ms at 256 rows; 256 rows within 3x the 1-row step of the same run).

    python scripts/plot_host.py --before 'docs/results/2026-12-07-host/session12_before_*.json' \\
        --after 'docs/results/2026-12-07-host/session12_after_*.json' --out docs/img/host_per_step.png
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GOAL_MS_AT_256 = 1.0


def decode_runs(pattern: str) -> dict[int, list[float]]:
    """rows -> host ms per step of each run (pure-decode cases only)."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise SystemExit(f"no files match {pattern!r}")
    by_rows: dict[int, list[float]] = {}
    for path in paths:
        for case in json.loads(Path(path).read_text()):
            if case["prefill_tokens"] == 0:
                by_rows.setdefault(case["rows"], []).append(case["host_ms_per_step"])
    return dict(sorted(by_rows.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="glob of the runs before")
    p.add_argument("--after", required=True, help="glob of the runs after")
    p.add_argument("--labels", default="before,after")
    p.add_argument("--title", default="host work per engine step (bench_host, mock model, 2-core CPU)")
    p.add_argument("--out", type=Path, default=Path("docs/img/host_per_step.png"))
    args = p.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for pattern, label, color in zip((args.before, args.after), args.labels.split(","), ("tab:gray", "tab:blue")):
        runs = decode_runs(pattern)
        rows = list(runs)
        med = [statistics.median(v) for v in runs.values()]
        ax.plot(rows, med, "o-", color=color, label=f"{label} (median of {len(runs[rows[0]])} runs)")
        ax.fill_between(rows, [min(v) for v in runs.values()], [max(v) for v in runs.values()], color=color, alpha=0.2)
        if 1 in runs:
            ax.plot([256], [3 * med[0]], "x", color=color, label=f"{label}: 3x its 1-row median")
    ax.axhline(GOAL_MS_AT_256, color="tab:red", linestyle="--", label="goal at 256 rows: 1.0 ms")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("running decode rows")
    ax.set_ylabel("host ms per step")
    ax.set_ylim(bottom=0)
    ax.set_title(args.title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
