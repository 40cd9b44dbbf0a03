"""`jaxserve` command line. The entry point: the only place that reads the environment.

jaxserve serve [--model M] [--host H] [--port P] [vLLM's engine flags]     the OpenAI-compatible server
jaxserve chat "question" [--model M] [--max-tokens N] [--temperature T]   one offline chat answer
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxserve")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve_parser(sub)
    chat = sub.add_parser("chat", help="answer one chat message offline (greedy) and print it")
    chat.add_argument("message")
    chat.add_argument("--model", default=None, help="HF folder or preset; default: the embedded SmolLM2-135M-Instruct")
    chat.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    chat.add_argument("--max-tokens", type=int, default=128)
    chat.add_argument("--max-model-len", type=int, default=2048)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    cache_dir = os.environ.get("JAXSERVE_CACHE_DIR")
    os.environ.setdefault(
        "TRANSFORMERS_VERBOSITY", "error"
    )  # transformers warns that torch is absent; we never need it
    if args.command == "chat":
        return _chat(args, cache_dir)
    if args.command == "serve":
        return _serve(args, cache_dir)
    return 2


def _add_serve_parser(sub) -> None:
    """vLLM's flag names where the meaning is the same; engine defaults are EngineConfig's."""
    from jaxserve.config import EngineConfig

    d = EngineConfig()
    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server (uvicorn)")
    serve.add_argument("model_tag", nargs="?", default=None, help="the model, as in `vllm serve MODEL`")
    serve.add_argument("--model", default=None, help="HF folder or preset; default: the embedded SmolLM2-135M-Instruct")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--served-model-name", nargs="+", default=None, help="names the API answers to (first: reported)"
    )
    serve.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health and /metrics"
    )
    serve.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=None,
        help="larger request bodies are refused with 413 (default 16 MiB)",
    )
    serve.add_argument("--tokenizer", default=None)
    serve.add_argument("--load-format", default=d.load_format, choices=["auto", "safetensors", "dummy"])
    serve.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16"])
    serve.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size)
    serve.add_argument("--max-model-len", type=int, default=d.max_model_len)
    serve.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    serve.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    serve.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    serve.add_argument("--seed", type=int, default=d.seed)
    serve.add_argument("--block-size", type=int, default=d.page_size, help="tokens per KV cache page")
    serve.add_argument(
        "--num-gpu-blocks-override", type=int, default=None, help="KV cache pages (default: from memory)"
    )
    serve.add_argument("--attention-impl", default=d.attention_impl, choices=["auto", "xla", "pallas", "reference"])
    serve.add_argument(
        "--row-bucket-growth",
        type=int,
        default=d.row_bucket_growth,
        help="factor between compiled request-count buckets; 0: one per token bucket (fewer "
        "shapes to compile: faster start-up)",
    )
    serve.add_argument(
        "--no-async-scheduling", action="store_true", help="wait for each step's tokens before scheduling the next"
    )
    serve.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=d.enable_prefix_caching,
        help="reuse the KV cache of prompt prefixes computed before (default on)",
    )
    serve.add_argument(
        "--no-executable-cache",
        action="store_true",
        help="do not keep compiled steps in the cache folder (a warm start then lowers them again)",
    )
    serve.add_argument(
        "--max-waiting-requests",
        type=int,
        default=None,
        help="sequences allowed to wait beyond --max-num-seqs before answering 503 (default 1024)",
    )
    serve.add_argument("--uvicorn-log-level", default="info")
    serve.add_argument("--fault-token-id", type=int, default=None, help=argparse.SUPPRESS)  # tests only


def _serve(args, cache_dir) -> int:
    import signal

    import uvicorn

    from jaxserve.config import EngineConfig
    from jaxserve.server import ServerSettings, create_app
    from jaxserve.server.settings import DEFAULT_MAX_REQUEST_BODY_BYTES

    engine = EngineConfig(
        model=args.model or args.model_tag,
        tokenizer=args.tokenizer,
        load_format=args.load_format,
        dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        seed=args.seed,
        page_size=args.block_size,
        num_kv_pages=args.num_gpu_blocks_override,
        attention_impl=args.attention_impl,
        cache_dir=cache_dir,
        max_waiting_requests=args.max_waiting_requests,
        row_bucket_growth=args.row_bucket_growth,
        async_scheduling=not args.no_async_scheduling,
        enable_prefix_caching=args.enable_prefix_caching,
        executable_cache=False if args.no_executable_cache else None,
    )
    settings = ServerSettings(
        engine=engine,
        served_model_names=tuple(args.served_model_name or ()),
        api_key=args.api_key or os.environ.get("JAXSERVE_API_KEY") or None,
        max_request_body_bytes=args.max_request_body_bytes or DEFAULT_MAX_REQUEST_BODY_BYTES,
        fault_token_id=args.fault_token_id,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            timeout_graceful_shutdown=None,
        )
    )
    # uvicorn drains in-flight requests on SIGTERM, restores the previous handler, then re-raises
    # the signal; a handler that does nothing lets that graceful stop end with exit status 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    return 0 if server.started else 1


def _chat(args, cache_dir) -> int:
    from jaxserve import LLM, SamplingParams

    # One conversation: a small bucket plan keeps warm-up short on a CPU.
    llm = LLM(
        args.model,
        dtype=args.dtype,
        cache_dir=cache_dir,
        max_num_seqs=1,
        max_num_batched_tokens=128,
        max_model_len=args.max_model_len,
    )
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    out = llm.chat([{"role": "user", "content": args.message}], params, use_tqdm=False)[0].outputs[0]
    print(f"user: {args.message}")
    print(f"assistant: {out.text.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
