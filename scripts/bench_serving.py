"""Online serving benchmark in the manner of `vllm bench serving`: random-token prompts sent over
HTTP to a running OpenAI-compatible server, as streaming completions, at a request rate (Poisson
arrivals, or all at once with inf) under an optional concurrency cap.

    jaxserve serve --dtype float32 --max-num-seqs 16 --max-num-batched-tokens 512 &
    python scripts/bench_serving.py --input-len 128 --output-len 64 --num-prompts 16

The prompts are those of scripts/bench_throughput.py for the same --num-prompts, --input-len,
--seed and vocabulary (token ids sent as they are: no tokenizer on the client), with ignore_eos,
temperature 1.0 and max_tokens = --output-len, so the two figures compare the same work. One
request warms the server first; the clock starts at the first send and stops at the last byte.

Prints requests/s, output and total tokens/s, TTFT, TPOT (time per output token after the
first), ITL (time between streamed chunks) and the latency of GET /health probes sent during the
run (the event loop's responsiveness), as mean, p50, p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_throughput import random_prompts  # noqa: E402  (scripts are not a package)


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], output_len: int) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 1.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, chunk_times, usage, error = None, [], None, None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            return dict(error=f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                error = data["error"]["message"]
            elif data.get("usage"):
                usage = data["usage"]
            elif data["choices"] and (data["choices"][0]["text"] or data["choices"][0]["finish_reason"] is None):
                # a token arrived (a server without a tokenizer streams tokens with empty text)
                now = time.perf_counter()
                ttft = ttft if ttft is not None else now - start
                chunk_times.append(now)
    end = time.perf_counter()
    out = usage["completion_tokens"] if usage else 0
    return dict(
        error=error,
        ttft=ttft,
        e2e=end - start,
        output_tokens=out,
        prompt_tokens=usage["prompt_tokens"] if usage else 0,
        itl=np.diff(chunk_times).tolist(),
        tpot=(end - start - ttft) / (out - 1) if out > 1 and ttft else None,
    )


async def run(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=None, limits=limits) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        prompts = random_prompts(args.num_prompts, args.input_len, args.vocab_size, args.seed)
        url = "/v1/completions"
        warm = await one_request(client, url, model, prompts[0][: min(16, args.input_len)], 4)
        if warm.get("error"):
            raise SystemExit(f"warm-up request failed: {warm['error']}")
        gate = asyncio.Semaphore(args.max_concurrency or len(prompts))
        rng = np.random.default_rng(args.seed)

        async def limited(p):
            async with gate:
                return await one_request(client, url, model, p, args.output_len)

        probe_latencies, done = [], asyncio.Event()

        async def probe():  # the event loop's responsiveness under load: /health round trips
            while not done.is_set():
                t = time.perf_counter()
                await client.get("/health")
                probe_latencies.append(time.perf_counter() - t)
                await asyncio.sleep(args.probe_interval)

        prober = asyncio.create_task(probe()) if args.probe_interval > 0 else None
        t0 = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(limited(p)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
        done.set()
        if prober is not None:
            await prober
    return dict(model=model, elapsed=elapsed, results=results, probe=probe_latencies)


def summarize(args, elapsed: float, results: list[dict], probe: list[float]) -> dict:
    ok = [r for r in results if not r.get("error")]
    failed = len(results) - len(ok)
    out_tokens = sum(r["output_tokens"] for r in ok)
    in_tokens = sum(r["prompt_tokens"] for r in ok)

    def stats(values, scale=1e3):
        values = np.asarray([v for v in values if v is not None], dtype=float) * scale
        if values.size == 0:
            return dict(mean=float("nan"), p50=float("nan"), p99=float("nan"))
        p50, p99 = np.percentile(values, [50, 99])
        return dict(mean=float(values.mean()), p50=float(p50), p99=float(p99))

    return dict(
        completed=len(ok),
        failed=failed,
        elapsed_s=elapsed,
        requests_per_second=len(ok) / elapsed,
        output_tokens_per_second=out_tokens / elapsed,
        total_tokens_per_second=(in_tokens + out_tokens) / elapsed,
        output_tokens=out_tokens,
        ttft_ms=stats(r["ttft"] for r in ok),
        tpot_ms=stats(r["tpot"] for r in ok),
        itl_ms=stats(v for r in ok for v in r["itl"]),
        e2e_ms=stats(r["e2e"] for r in ok),
        health_ms=stats(probe),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--api-key", default=None)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=49152, help="of the served model (SmolLM2: 49152)")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--probe-interval",
        type=float,
        default=0.1,
        help="seconds between GET /health probes during the run (0: none); their latency shows "
        "whether the event loop stays responsive under load",
    )
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    run_result = asyncio.run(run(args))
    s = summarize(args, run_result["elapsed"], run_result["results"], run_result["probe"])
    print(f"Completed {s['completed']} requests ({s['failed']} failed) in {s['elapsed_s']:.2f} s")
    print(
        f"Throughput: {s['requests_per_second']:.2f} requests/s, {s['total_tokens_per_second']:.2f} total tokens/s, "
        f"{s['output_tokens_per_second']:.2f} output tokens/s"
    )
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "health_ms"):
        v = s[name]
        print(f"{name[:-3].upper():>5} ms: mean {v['mean']:.1f}, p50 {v['p50']:.1f}, p99 {v['p99']:.1f}")
    if args.output_json:
        record = dict(vars(args), **s, model=run_result["model"], date=str(date.today()), host=platform.node())
        Path(args.output_json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
