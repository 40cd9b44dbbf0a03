"""A JAX profiler trace, summarised per plane and line: what scripts/profile_step.py and
scripts/profile_kernels.py print and save."""

from __future__ import annotations

import glob
from collections import defaultdict
from pathlib import Path


def summarise_trace(path: str, top: int = 12) -> list[dict]:
    """Per plane and line of an .xplane.pb: events, their union busy time and the top names."""
    from jax.profiler import ProfileData

    lines = []
    for plane in ProfileData.from_file(path).planes:
        if plane.name.startswith("/host:metadata"):
            continue
        for line in plane.lines:
            events = [(e.name, e.start_ns, e.duration_ns) for e in line.events]
            if not events:
                continue
            by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
            spans = sorted((s, s + d) for _, s, d in events)
            busy, end = 0.0, -1.0
            for s, e in spans:  # union of the events' intervals
                if e > end:
                    busy += e - max(s, end)
                    end = e
            for name, _, d in events:
                if "profiler.py" in name or "contextlib.py" in name:  # the trace's own frames
                    continue
                by_name[name][0] += 1
                by_name[name][1] += d
            ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
            lines.append(
                dict(
                    plane=plane.name,
                    line=line.name,
                    events=len(events),
                    busy_ms=busy / 1e6,
                    span_ms=(spans[-1][1] - spans[0][0]) / 1e6,
                    top=[dict(name=n[:120], count=c, ms=d / 1e6) for n, (c, d) in ranked],
                )
            )
    return lines


def traced(folder: Path, run, top: int = 12) -> list[dict]:
    """Runs run() under the JAX profiler, writing its trace to `folder`; the trace's summary (the
    `top` names of each line by time)."""
    import jax

    with jax.profiler.trace(str(folder)):
        run()
    files = glob.glob(str(folder / "**" / "*.xplane.pb"), recursive=True)
    return summarise_trace(files[-1], top) if files else []
