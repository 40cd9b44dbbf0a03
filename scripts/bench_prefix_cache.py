"""Prefix caching, measured through the OpenAI-compatible server: the same workloads with
caching on and off (issue 16).

    shared     one system prompt of --system-len tokens shared by --num-requests requests, each
               with its own --user-len-token user turn (a request with the system prompt runs
               first, alone, in both modes, so that the timed requests could all find it)
    multiturn  --conversations conversations of --turns turns: turn 1 is --first-len fresh
               tokens, each later turn resends the conversation so far (prompt, the answer's
               token ids, a new --user-len-token user turn); conversations run side by side
    random     --num-requests fresh random prompts of --system-len + --user-len tokens: a 0% hit
               rate, so caching can only cost (its bookkeeping, evicting pages it will never use)

All greedy, ignore_eos, --output-len tokens each, streamed, at most --max-concurrency requests
in flight (a closed loop: each finished request lets the next one in). Prompts are random token
ids in [100, vocab - 100) (no tokenizer needed: dummy-weight presets serve ids). The cache is
reset (POST /reset_prefix_cache) before each workload.

By default the script starts the server itself, once with --enable-prefix-caching and once with
--no-enable-prefix-caching (`python -m jaxserve serve --port P` + --server-args), and stops it
after; --base-url measures a server already running instead (one mode, named by --label).

Reports per workload and mode: TTFT p50/p90 (ms), throughput (requests/s, output and total
tokens/s), the hit rate (cached / prompt tokens, from the responses' usage), the server's CPU
seconds (user + system, from /proc, for a server the script started: on a shared CPU machine the
figure that other load moves least) and the ratios (TTFT off/on, throughput on/off).

    # CPU, the embedded SmolLM2 (a few minutes):
    .venv/bin/python scripts/bench_prefix_cache.py --system-len 512 --user-len 32 --output-len 16 \\
        --num-requests 16 --max-concurrency 4 --first-len 256 --conversations 4 --turns 4 \\
        --server-args "--dtype float32 --max-num-seqs 8 --max-num-batched-tokens 512 --max-model-len 2048"
    # one H200, Llama-3.1-8B bf16 dummy weights (vocabulary 128256):
    python scripts/bench_prefix_cache.py --vocab-size 128256 --system-len 2000 --user-len 100 \\
        --output-len 64 --num-requests 256 --max-concurrency 32 --first-len 1000 --conversations 32 \\
        --turns 6 --server-args "--model llama-3.1-8b --load-format dummy --dtype bfloat16 \\
        --max-num-seqs 128 --max-num-batched-tokens 2048 --max-model-len 8192"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("shared", "multiturn", "random")


# -- one request -------------------------------------------------------------------------------
async def complete(client: httpx.AsyncClient, model: str, prompt: list[int], output_len: int, ids: bool = False):
    """One streamed greedy completion: TTFT, end-to-end time, tokens, cached tokens and (ids) the
    answer's token ids, read from logprobs ("token_id:N" where the server has no tokenizer)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ids:
        body["logprobs"] = 0
    start = time.perf_counter()
    ttft, usage, text, tokens = None, None, "", []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(data["error"]["message"])
            if data.get("usage"):
                usage = data["usage"]
            for choice in data.get("choices", []):
                if ttft is None and (choice["text"] or choice.get("logprobs") or choice["finish_reason"] is None):
                    ttft = time.perf_counter() - start
                text += choice["text"]
                if choice.get("logprobs"):
                    tokens += choice["logprobs"]["tokens"]
    details = usage.get("prompt_tokens_details") or {}
    answer = None
    if ids:
        if tokens and all(t.startswith("token_id:") for t in tokens):
            answer = [int(t.split(":", 1)[1]) for t in tokens]
        else:  # a server with a tokenizer names tokens by their text: tokenize the answer back
            r = await client.post("/tokenize", json={"model": model, "prompt": text, "add_special_tokens": False})
            answer = r.json()["tokens"]
    return dict(
        ttft=ttft,
        e2e=time.perf_counter() - start,
        prompt_tokens=usage["prompt_tokens"],
        output_tokens=usage["completion_tokens"],
        cached_tokens=details.get("cached_tokens", 0),
        answer=answer,
    )


# -- workloads -----------------------------------------------------------------------------------
def random_ids(rng, n: int, vocab: int) -> list[int]:
    return rng.integers(100, vocab - 100, size=n).tolist()


async def closed_loop(client, model, prompts: list[list[int]], args) -> tuple[float, list[dict]]:
    gate = asyncio.Semaphore(args.max_concurrency)

    async def one(p):
        async with gate:
            return await complete(client, model, p, args.output_len)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - t0, results


async def shared(client, model, args, rng):
    system = random_ids(rng, args.system_len, args.vocab_size)
    prompts = [system + random_ids(rng, args.user_len, args.vocab_size) for _ in range(args.num_requests)]
    await complete(client, model, system + random_ids(rng, args.user_len, args.vocab_size), args.output_len)
    return await closed_loop(client, model, prompts, args)


async def random_prompts(client, model, args, rng):
    n = args.system_len + args.user_len
    prompts = [random_ids(rng, n, args.vocab_size) for _ in range(args.num_requests)]
    await complete(client, model, random_ids(rng, n, args.vocab_size), args.output_len)  # as shared's warm-up
    return await closed_loop(client, model, prompts, args)


async def multiturn(client, model, args, rng):
    firsts = [random_ids(rng, args.first_len, args.vocab_size) for _ in range(args.conversations)]
    users = [[random_ids(rng, args.user_len, args.vocab_size) for _ in range(args.turns)] for _ in firsts]

    async def conversation(c: int) -> list[dict]:
        history, results = firsts[c], []
        for turn in range(args.turns):
            prompt = history + (users[c][turn] if turn else [])
            result = await complete(client, model, prompt, args.output_len, ids=turn < args.turns - 1)
            results.append(result)
            history = prompt + (result["answer"] or [])
        return results

    t0 = time.perf_counter()
    per_conversation = await asyncio.gather(*(conversation(c) for c in range(args.conversations)))
    return time.perf_counter() - t0, [r for conv in per_conversation for r in conv]


def summarize(elapsed: float, results: list[dict], skip_first_turns: int = 0) -> dict:
    prompt = sum(r["prompt_tokens"] for r in results)
    output = sum(r["output_tokens"] for r in results)
    ttft = np.asarray([r["ttft"] for r in results], float) * 1e3
    return dict(
        requests=len(results),
        elapsed_s=elapsed,
        requests_per_s=len(results) / elapsed,
        output_tokens_per_s=output / elapsed,
        total_tokens_per_s=(prompt + output) / elapsed,
        ttft_p50_ms=float(np.percentile(ttft, 50)),
        ttft_p90_ms=float(np.percentile(ttft, 90)),
        e2e_p50_ms=float(np.percentile([r["e2e"] * 1e3 for r in results], 50)),
        prompt_tokens=prompt,
        cached_tokens=sum(r["cached_tokens"] for r in results),
        hit_rate=sum(r["cached_tokens"] for r in results) / max(prompt, 1),
    )


async def run_all(base_url: str, args, cpu_seconds=lambda: None) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=None, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        out = {}
        for name in args.workloads.split(","):
            rng = np.random.default_rng([args.seed, WORKLOADS.index(name)])  # the same prompts in each mode
            r = await client.post("/reset_prefix_cache")
            r.raise_for_status()
            cpu0 = cpu_seconds()
            elapsed, results = await {"shared": shared, "multiturn": multiturn, "random": random_prompts}[name](
                client, model, args, rng
            )
            cpu1 = cpu_seconds()
            out[name] = s = summarize(elapsed, results)
            s["server_cpu_s"] = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
            cpu = "" if s["server_cpu_s"] is None else f", server CPU {s['server_cpu_s']:7.1f} s"
            print(
                f"  {name:9s} {s['requests']:4d} requests in {s['elapsed_s']:7.2f} s: TTFT p50 {s['ttft_p50_ms']:8.1f} ms, "
                f"{s['output_tokens_per_s']:8.1f} output tok/s, {s['total_tokens_per_s']:9.1f} total tok/s, "
                f"hit rate {100 * s['hit_rate']:5.1f}%{cpu}",
                flush=True,
            )
        return out


# -- a server of our own ---------------------------------------------------------------------------
class Server:
    def __init__(self, server_args: list[str], caching: bool, timeout: float):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        flag = "--enable-prefix-caching" if caching else "--no-enable-prefix-caching"
        cmd = [sys.executable, "-m", "jaxserve", "serve", "--port", str(self.port), flag, *server_args]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="bench-prefix-cache-", suffix=".log", delete=False)
        print(f"starting: {shlex.join(cmd)}  (log: {self.log.name})", flush=True)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the server was not ready in {timeout:.0f} s:\n{self.tail()}")
            time.sleep(1)

    def cpu_seconds(self) -> float | None:
        """The server process's user + system CPU seconds so far (Linux), else None."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def device_name() -> str:
    try:
        names = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        ).stdout.split("\n")
        names = [n.strip() for n in names if n.strip()]
        if names:
            return f"{len(names)} x {names[0]}"
    except (OSError, subprocess.SubprocessError):
        pass
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server-args", default="", help="flags for `jaxserve serve` (model, dtype, sizes)")
    p.add_argument("--base-url", default=None, help="measure this running server instead of starting two")
    p.add_argument("--label", default="server", help="the mode's name with --base-url")
    p.add_argument("--modes", default="on,off", help="the servers to start, in this order (on: caching on)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--vocab-size", type=int, default=49152, help="of the served model (SmolLM2: 49152)")
    p.add_argument("--system-len", type=int, default=2000)
    p.add_argument("--user-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--first-len", type=int, default=1000, help="multiturn: the first turn's prompt")
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=3600)
    p.add_argument("--output-json", type=Path, default=None)
    args = p.parse_args()
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        raise SystemExit(f"unknown workloads {sorted(unknown)}; choose from {WORKLOADS}")

    results = {}
    if args.base_url:
        print(f"{args.label}:", flush=True)
        results[args.label] = asyncio.run(run_all(args.base_url, args))
    else:
        for mode in args.modes.split(","):
            if mode not in ("on", "off"):
                raise SystemExit(f"--modes: on and off, not {mode!r}")
            server = Server(shlex.split(args.server_args), mode == "on", args.startup_timeout)
            try:
                print(f"prefix caching {mode}:", flush=True)
                results[mode] = asyncio.run(run_all(server.url, args, server.cpu_seconds))
            finally:
                server.stop()
    if {"on", "off"} <= set(results):
        print(
            "\nworkload   TTFT p50 on / off (ms)   off/on   output tok/s on / off   on/off   "
            "server CPU s on / off   hit rate on"
        )
        for name in results["on"]:
            on, off = results["on"][name], results["off"][name]
            cpu = "        n/a        "
            if on["server_cpu_s"] is not None and off["server_cpu_s"] is not None:
                cpu = f"{on['server_cpu_s']:8.1f} / {off['server_cpu_s']:8.1f}"
            print(
                f"{name:9s}  {on['ttft_p50_ms']:9.1f} / {off['ttft_p50_ms']:9.1f}  {off['ttft_p50_ms'] / on['ttft_p50_ms']:6.2f}x"
                f"  {on['output_tokens_per_s']:9.1f} / {off['output_tokens_per_s']:9.1f}"
                f"  {on['output_tokens_per_s'] / off['output_tokens_per_s']:6.3f}   {cpu}   {100 * on['hit_rate']:5.1f}%"
            )
    if args.output_json:
        record = dict(
            date=date.today().isoformat(),
            device=device_name(),
            command=shlex.join([sys.executable, *sys.argv]),
            args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            results=results,
        )
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
