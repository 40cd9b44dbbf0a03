"""Online serving benchmark with `vllm bench serve`'s flags and result block: the same command line
runs against jaxserve or any OpenAI-compatible server, and a script that reads vLLM's block reads
this one.

    jaxserve serve &        # or: make serve
    python scripts/bench_serving.py --backend openai --dataset-name random \
        --random-input-len 128 --random-output-len 64 --num-prompts 16 --ignore-eos

Prompts (jaxserve/benchmarks/datasets.py): vLLM's random dataset, or a local ShareGPT JSON
(--dataset-name sharegpt --dataset-path FILE), made with the client's tokenizer: --tokenizer, else
--model when it is a folder, else the embedded default model's. Requests are streamed completions
(--backend openai, --endpoint /v1/completions) or chat completions (openai-chat,
/v1/chat/completions), sent at --request-rate (Poisson arrivals, gamma with --burstiness; inf: all
at once) under an optional --max-concurrency, greedy unless --temperature says otherwise. One
request is sent first to check the server (not counted); the clock starts at the first send of the
run and stops at the last byte.

TTFT: time to the first streamed text; TPOT: (latency - TTFT) / (output tokens - 1); ITL: time
between streamed chunks; output tokens from the server's usage (else the tokenizer's count).
Beyond vLLM's block, the latency of GET /health probes sent during the run (--probe-interval):
whether the server's event loop stays responsive under load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np

from jaxserve.benchmarks.datasets import load_client_tokenizer, random_requests, sharegpt_requests

METRICS = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
}
METRICS["e2el"] = "End-to-end Latency"
ENDPOINTS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=sorted(ENDPOINTS), default="openai")
    p.add_argument("--base-url", default=None, help="server URL (default: http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default=None, help="default: /v1/completions, or /v1/chat/completions for openai-chat")
    p.add_argument("--model", default=None, help="default: the first of the server's /v1/models")
    p.add_argument("--served-model-name", default=None, help="the name sent in requests (default: --model)")
    p.add_argument(
        "--tokenizer", default=None, help="folder or name (default: --model's folder, or the embedded model's)"
    )
    p.add_argument("--api-key", default=None, help="sent as a bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--dataset-name", choices=["random", "sharegpt"], default="random")
    p.add_argument("--dataset-path", default=None, help="a local ShareGPT JSON for --dataset-name sharegpt")
    p.add_argument("--input-len", type=int, default=None, help="sets --random-input-len")
    p.add_argument("--output-len", type=int, default=None, help="sets --random-output-len / --sharegpt-output-len")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--random-prefix-len", type=int, default=0)
    p.add_argument("--sharegpt-output-len", type=int, default=None)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s; inf: all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="1: Poisson arrivals; else gamma intervals")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--num-warmups", type=int, default=0, help="requests sent before the run (not counted)")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl", help="of ttft, tpot, itl, e2el")
    p.add_argument("--metric-percentiles", default="99", help='e.g. "25,50,75"')
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--result-dir", default=None)
    p.add_argument("--result-filename", default=None)
    p.add_argument("--label", default=None, help="prefix of the result file name (default: --backend)")
    p.add_argument("--disable-tqdm", action="store_true")
    sampling = p.add_argument_group("sampling parameters (default: greedy)")
    for name, kind in (
        ("--temperature", float),
        ("--top-p", float),
        ("--top-k", int),
        ("--min-p", float),
        ("--frequency-penalty", float),
        ("--presence-penalty", float),
        ("--repetition-penalty", float),
        ("--logprobs", int),
    ):
        sampling.add_argument(name, type=kind, default=None)
    p.add_argument(
        "--probe-interval",
        type=float,
        default=0.1,
        help="seconds between GET /health probes during the run (0: none); their latency shows whether the "
        "event loop stays responsive under load",
    )
    return p


def request_body(args, model: str, prompt, output_len: int) -> dict:
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
    if args.backend == "openai-chat":
        body.update(messages=[{"role": "user", "content": prompt}], max_completion_tokens=output_len)
    else:
        body.update(prompt=prompt, max_tokens=output_len)
    body["temperature"] = 0.0 if args.temperature is None else args.temperature
    for name in ("top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "logprobs"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.ignore_eos:
        body["ignore_eos"] = True
    return body


async def send(client: httpx.AsyncClient, url: str, body: dict, chat: bool) -> dict:
    """One streamed request: success, ttft, itl (s), latency, output tokens (from usage), text."""
    start = time.perf_counter()
    out = dict(success=False, ttft=0.0, itl=[], latency=0.0, output_tokens=0, text="", error="", start=start)
    last = start
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                out["error"] = f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    out["error"] = str(data["error"].get("message", data["error"]))
                    return out
                if data.get("usage"):
                    out["output_tokens"] = data["usage"].get("completion_tokens") or 0
                for choice in data.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if text:
                        now = time.perf_counter()
                        if not out["text"]:
                            out["ttft"] = now - start
                        else:
                            out["itl"].append(now - last)
                        last = now
                        out["text"] += text
    except httpx.HTTPError as e:
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    out["latency"] = time.perf_counter() - start
    out["success"] = True
    return out


def arrival_delays(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds from the run's start to each send: gamma intervals with mean 1/rate (Poisson at
    burstiness 1), scaled so that the last send is at n / rate; all 0 at an infinite rate."""
    if rate == float("inf"):
        return [0.0] * n
    if burstiness <= 0:
        raise ValueError("--burstiness must be > 0")
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    delays = np.cumsum(gaps)
    return (delays * (n / rate) / delays[-1]).tolist() if delays[-1] > 0 else delays.tolist()


async def run(args, requests, model: str, tokenizer) -> tuple[float, list[dict], list[float]]:
    base = args.base_url or f"http://{args.host}:{args.port}"
    url = args.endpoint or ENDPOINTS[args.backend]
    key = args.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    chat = args.backend == "openai-chat"
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=None, limits=limits) as client:
        print("Starting initial single prompt test run...")
        first = requests[0]
        check = await send(client, url, request_body(args, model, first.prompt, first.expected_output_len), chat)
        if not check["success"]:
            raise SystemExit(f"Initial test run failed: {check['error']}")
        print("Initial test run completed.")
        warm = [request_body(args, model, first.prompt, first.expected_output_len)] * args.num_warmups
        await asyncio.gather(*(send(client, url, b, chat) for b in warm))
        gate = asyncio.Semaphore(args.max_concurrency or len(requests))

        async def limited(body):
            async with gate:
                return await send(client, url, body, chat)

        probes, done = [], asyncio.Event()

        async def probe():  # the event loop's responsiveness under load: /health round trips
            while not done.is_set():
                t = time.perf_counter()
                await client.get("/health")
                probes.append(time.perf_counter() - t)
                await asyncio.sleep(args.probe_interval)

        print(f"Traffic request rate: {args.request_rate}")
        print(f"Burstiness factor: {args.burstiness} ({'Poisson process' if args.burstiness == 1 else 'Gamma'})")
        print(f"Maximum request concurrency: {args.max_concurrency}")
        prober = asyncio.create_task(probe()) if args.probe_interval > 0 else None
        delays = arrival_delays(len(requests), args.request_rate, args.burstiness, args.seed)
        t0 = time.perf_counter()
        tasks = []
        for req, delay in zip(requests, delays):
            wait = t0 + delay - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(limited(request_body(args, model, req.prompt, req.expected_output_len))))
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        done.set()
        if prober is not None:
            await prober
    for o in outputs:  # a server that reports no usage: count the text's tokens, as vLLM does
        if o["success"] and not o["output_tokens"] and tokenizer is not None:
            o["output_tokens"] = len(tokenizer.encode(o["text"], add_special_tokens=False))
    return duration, outputs, probes


def calculate(requests, outputs: list[dict], duration: float, percentiles: list[float]) -> dict:
    ok = [(r, o) for r, o in zip(requests, outputs) if o["success"]]
    ttfts = [o["ttft"] for _, o in ok]
    tpots = [(o["latency"] - o["ttft"]) / (o["output_tokens"] - 1) for _, o in ok if o["output_tokens"] > 1]
    itls = [x for _, o in ok for x in o["itl"]]
    e2els = [o["latency"] for _, o in ok]
    total_in = sum(r.prompt_len for r, _ in ok)
    total_out = sum(o["output_tokens"] for _, o in ok)
    result = dict(
        duration=duration,
        completed=len(ok),
        failed=len(outputs) - len(ok),
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / duration,
        output_throughput=total_out / duration,
        total_token_throughput=(total_in + total_out) / duration,
    )
    result.update(peak_output(ok))
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        ms = np.asarray(values or [0.0]) * 1e3
        result[f"mean_{name}_ms"], result[f"median_{name}_ms"] = float(ms.mean()), float(np.median(ms))
        result[f"std_{name}_ms"] = float(ms.std())
        for p in percentiles:
            result[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    result.update(
        input_lens=[r.prompt_len for r in requests],
        output_lens=[o["output_tokens"] for o in outputs],
        ttfts=[o["ttft"] for o in outputs],
        itls=[o["itl"] for o in outputs],
        generated_texts=[o["text"] for o in outputs],
        errors=[o["error"] for o in outputs],
    )
    return result


def peak_output(ok) -> dict:
    """The most output tokens streamed in one second of the run, and the requests in flight then."""
    if not ok:
        return dict(max_output_tokens_per_s=0.0, max_concurrent_requests=0)
    t0 = min(o["start"] for _, o in ok)
    seconds = int(np.ceil(max(o["start"] + o["latency"] for _, o in ok) - t0)) + 1
    tokens, active = np.zeros(seconds), np.zeros(seconds)
    for _, o in ok:
        t = o["start"] + o["ttft"]
        for moment in np.concatenate([[t], t + np.cumsum(o["itl"])]):
            tokens[min(int(moment - t0), seconds - 1)] += 1
        active[int(o["start"] - t0) : int(o["start"] + o["latency"] - t0) + 1] += 1
    peak = int(np.argmax(tokens))
    return dict(max_output_tokens_per_s=float(tokens[peak]), max_concurrent_requests=int(active.max()))


def print_block(args, result: dict, percentiles: list[float], metrics: list[str]) -> None:
    row = lambda label, value, fmt="": print(f"{label:<40} {value:<10{fmt}}")  # noqa: E731
    print(f"{' Serving Benchmark Result ':=^50}")
    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    if args.max_concurrency is not None:
        row("Maximum request concurrency:", args.max_concurrency)
    if args.request_rate != float("inf"):
        row("Request rate configured (RPS):", args.request_rate, ".2f")
    row("Benchmark duration (s):", result["duration"], ".2f")
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"], ".2f")
    row("Output token throughput (tok/s):", result["output_throughput"], ".2f")
    row("Peak output token throughput (tok/s):", result["max_output_tokens_per_s"], ".2f")
    row("Peak concurrent requests:", result["max_concurrent_requests"], ".2f")
    row("Total token throughput (tok/s):", result["total_token_throughput"], ".2f")
    for name in metrics:
        print(f"{METRICS[name]:-^50}")
        label = name.upper()
        row(f"Mean {label} (ms):", result[f"mean_{name}_ms"], ".2f")
        row(f"Median {label} (ms):", result[f"median_{name}_ms"], ".2f")
        for p in percentiles:
            row(f"P{p:g} {label} (ms):", result[f"p{p:g}_{name}_ms"], ".2f")
    print("=" * 50)


def main(argv: list[str] | None = None) -> dict:
    # transformers advises at import that PyTorch is absent; the client never needs it.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = make_parser().parse_args(argv)
    metrics = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    if unknown := set(metrics) - set(METRICS):
        raise SystemExit(f"--percentile-metrics: unknown {sorted(unknown)}; choose of {sorted(METRICS)}")
    percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    base = args.base_url or f"http://{args.host}:{args.port}"
    model = args.model
    if model is None:
        key = args.api_key or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        model = httpx.get(f"{base}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    tokenizer = load_client_tokenizer(args.tokenizer, model)
    if args.dataset_name == "sharegpt":
        if args.dataset_path is None:
            raise SystemExit("--dataset-name sharegpt needs --dataset-path: a local ShareGPT JSON")
        output_len = args.output_len or args.sharegpt_output_len
        requests = sharegpt_requests(
            args.dataset_path, tokenizer, args.num_prompts, output_len=output_len, seed=args.seed
        )
    else:
        requests = random_requests(
            args.num_prompts,
            args.input_len or args.random_input_len,
            args.output_len or args.random_output_len,
            tokenizer=tokenizer,
            range_ratio=args.random_range_ratio,
            prefix_len=args.random_prefix_len,
            seed=args.seed,
        )
    served = args.served_model_name or model
    duration, outputs, probes = asyncio.run(run(args, requests, served, tokenizer))
    result = calculate(requests, outputs, duration, percentiles)
    print_block(args, result, percentiles, metrics)
    if probes:
        ms = np.asarray(probes) * 1e3
        result["health_ms"] = dict(mean=float(ms.mean()), p50=float(np.median(ms)), p99=float(np.percentile(ms, 99)))
        print(
            f"GET /health during the run (ms): mean {ms.mean():.1f}, median {np.median(ms):.1f}, "
            f"P99 {np.percentile(ms, 99):.1f} ({len(ms)} probes)"
        )
    if args.save_result:
        now = datetime.now()
        result.update(
            date=now.strftime("%Y%m%d-%H%M%S"),
            backend=args.backend,
            model_id=model,
            tokenizer_id=args.tokenizer or model,
            num_prompts=args.num_prompts,
            request_rate=args.request_rate if args.request_rate < float("inf") else "inf",
            burstiness=args.burstiness,
            max_concurrency=args.max_concurrency,
        )
        name = args.result_filename or (
            f"{args.label or args.backend}-{args.request_rate}qps-{model.split('/')[-1]}-{result['date']}.json"
        )
        path = Path(args.result_dir or ".") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
