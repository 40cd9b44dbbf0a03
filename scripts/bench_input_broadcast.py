"""What serving from several processes adds to each engine step: one input exchange
(jaxserve/engine/multihost.py's InputBroadcast), timed on process 0.

    python scripts/bench_input_broadcast.py [--processes 2] [--devices-per-process 2] [--output-json F]

Starts --processes copies of itself on loopback (jax.distributed; gloo on CPUs), each with
--devices-per-process fake CPU devices (XLA_FLAGS), then times --exchanges exchanges after --warm:
an empty turn, and a turn bringing one request of --prompt-len tokens. Prints, per case, the wall
time and process 0's host CPU time (time.thread_time) of one exchange. On GPUs, pass
--devices-per-process 0 to keep the devices as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args) -> None:
    from jaxserve.config import DistributedConfig
    from jaxserve.engine import multihost

    dist = DistributedConfig(args.coordinator, args.processes, args.process_id)
    multihost.initialize(dist)
    import jax

    from jaxserve.engine.messages import AddRequest
    from jaxserve.sampling_params import SamplingParams

    broadcast = multihost.InputBroadcast(is_leader=dist.is_leader)
    request = [AddRequest("r", list(range(args.prompt_len)), SamplingParams(max_tokens=16))]
    results = []
    for label, inputs in (("empty", []), (f"one {args.prompt_len}-token request", request)):
        mine = inputs if dist.is_leader else []
        for _ in range(args.warm):
            broadcast.exchange(mine)
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(args.exchanges):
            got = broadcast.exchange(mine)
        wall, cpu = (time.perf_counter() - t0) / args.exchanges, (time.thread_time() - c0) / args.exchanges
        assert got == inputs, "a process received something else than process 0 sent"
        results.append({"case": label, "wall_ms": round(1e3 * wall, 4), "host_cpu_ms": round(1e3 * cpu, 4)})
    if dist.is_leader:
        print(json.dumps({"backend": jax.default_backend(), "devices": jax.device_count(), "cases": results}))
    jax.distributed.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=2, help="fake CPU devices each (0: leave as is)")
    p.add_argument("--exchanges", type=int, default=200)
    p.add_argument("--warm", type=int, default=20)
    p.add_argument("--prompt-len", type=int, default=200)
    p.add_argument("--output-json", type=Path)
    p.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)  # set for the workers
    p.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.process_id is not None:
        return worker(args)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if args.devices_per_process:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices_per_process}"
    coordinator = f"127.0.0.1:{free_port()}"
    base = [sys.executable, __file__, "--processes", str(args.processes), "--coordinator", coordinator]
    base += ["--exchanges", str(args.exchanges), "--warm", str(args.warm), "--prompt-len", str(args.prompt_len)]
    procs = [
        subprocess.Popen(base + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        for i in range(args.processes)
    ]
    outs = [proc.communicate(timeout=600)[0].decode() for proc in procs]
    if any(proc.returncode for proc in procs):
        sys.exit(f"a worker failed: exit codes {[proc.returncode for proc in procs]}")
    result = json.loads(outs[0].strip().splitlines()[-1])
    result.update(processes=args.processes, load_avg_1m=round(os.getloadavg()[0], 2))
    for case in result["cases"]:
        print(f"{case['case']:>28}: {case['wall_ms']:.3f} ms wall, {case['host_cpu_ms']:.3f} ms host CPU per exchange")
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
