"""Start-up time of `jaxserve serve`: from launching the process to the first streamed token of a
completion, with an empty persistent compilation cache (cold) and then with the cache it left
(warm). Also the server's peak host memory (VmHWM) and the GPU memory in use once it serves.

    python scripts/bench_startup.py --output-json startup.json -- \
        --model llama-3.1-8b --load-format dummy --dtype bfloat16

Everything after `--` goes to `jaxserve serve`. Each run uses a fresh port and the same cache
folder (a temporary one unless --cache-dir is given); the cold run empties it first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def first_token_seconds(base_url: str, proc: subprocess.Popen, t0: float, timeout: float) -> float:
    """Polls until a streamed completion yields its first token; returns seconds since t0."""
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode} before serving")
        try:
            model = httpx.get(f"{base_url}/v1/models", timeout=2).json()["data"][0]["id"]
            body = dict(model=model, prompt=[1, 2, 3, 4], max_tokens=1, stream=True, ignore_eos=True)
            with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:]).get("choices"):
                        return time.perf_counter() - t0
        except (httpx.TransportError, KeyError, IndexError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"no token within {timeout} s")


def gpu_memory_used_mib() -> float | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return float(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="cold,warm", help="comma-separated: cold, warm, xla-only")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--timeout", type=float, default=400)
    p.add_argument("--output-json", default=None)
    p.add_argument("serve_args", nargs=argparse.REMAINDER)
    args = p.parse_args()
    serve_args = [a for a in args.serve_args if a != "--"]
    cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="jaxserve-cache-"))
    results = []
    for i, kind in enumerate(args.runs.split(",")):
        # cold: nothing compiled is kept; xla-only: JAX's compilation cache but not the engine's
        # own records (compiled steps, step workspace); warm: all of them.
        for folder in {"cold": ("xla", "executables", "workspace"), "xla-only": ("executables", "workspace")}.get(
            kind, ()
        ):
            shutil.rmtree(cache_dir / folder, ignore_errors=True)
        port = args.port + i
        env = dict(os.environ, JAXSERVE_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1")
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jaxserve",
                "serve",
                "--port",
                str(port),
                "--uvicorn-log-level",
                "warning",
                *serve_args,
            ],
            env=env,
        )
        try:
            seconds = first_token_seconds(f"http://127.0.0.1:{port}", proc, t0, args.timeout)
            record = dict(
                run=kind,
                seconds_to_first_token=seconds,
                peak_host_rss_mib=peak_rss_mib(proc.pid),
                gpu_memory_used_mib=gpu_memory_used_mib(),
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        mib = lambda v: "n/a" if v is None else f"{v:.0f} MiB"  # noqa: E731
        print(
            f"start-up ({kind} compilation cache): first token after {seconds:.1f} s; peak host memory "
            f"{mib(record['peak_host_rss_mib'])}; GPU memory in use {mib(record['gpu_memory_used_mib'])}",
            flush=True,
        )
        results.append(record)
    if args.output_json:
        Path(args.output_json).write_text(
            json.dumps(dict(serve_args=serve_args, results=results, date=time.strftime("%Y-%m-%d")), indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
