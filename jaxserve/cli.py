"""`jaxserve` command line. The entry point: the only place that reads the environment.

jaxserve serve [MODEL] [--host H] [--port P] [engine flags]     the OpenAI-compatible server
jaxserve serve ... --coordinator-address H0:PORT --num-processes N --process-id I
                                     one of N processes (hosts) over one mesh: process 0 serves HTTP,
                                     the others run the engine only (jaxserve/engine/multihost.py)
jaxserve chat "question" [--max-tokens N] [--temperature T] [engine flags]   one offline chat answer

The engine flags (vLLM's names: --model, --max-num-seqs, --block-size, ...) are generated from
EngineConfig (jaxserve/engine_args.py), as are the engine scripts' in scripts/.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxserve.engine_args import CPU_PLAN, add_engine_args, default_plan, engine_config, multi_gpu_environment


def main(argv: list[str] | None = None) -> int:
    # transformers advises at import that PyTorch is absent; jaxserve never needs it.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = argparse.ArgumentParser(prog="jaxserve")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve_parser(sub)
    chat = sub.add_parser(
        "chat",
        help="answer one chat message offline and print it",
        description="One chat answer, offline. Without plan flags the plan is the small CPU one on any device.",
    )
    chat.add_argument("message")
    chat.add_argument("--max-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.0)
    add_engine_args(chat)
    args = parser.parse_args(argv)
    cache_dir = os.environ.get("JAXSERVE_CACHE_DIR")
    if args.command == "chat":
        return _chat(args, cache_dir)
    if args.command == "serve":
        return _serve(args, cache_dir)
    return 2


def _add_serve_parser(sub) -> None:
    """vLLM's flag names where the meaning is the same; engine defaults are EngineConfig's."""
    serve = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server (uvicorn)",
        description="The OpenAI-compatible server. On a CPU, without plan flags, the plan is the small "
        "CPU one (" + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in CPU_PLAN.items()) + ").",
    )
    serve.add_argument("model_tag", nargs="?", default=None, help="the model, as in `vllm serve MODEL`")
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
    serve.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='tool_choice "auto": parse tool calls out of the model\'s text (needs --tool-call-parser)',
    )
    serve.add_argument(
        "--tool-call-parser", default=None, choices=["hermes", "llama3_json", "mistral"], help="the tool-call format"
    )
    serve.add_argument("--uvicorn-log-level", default="info")
    serve.add_argument(
        "--engine-in-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the engine core on a thread of the server's process (debugging) instead of a process of its own",
    )
    serve.add_argument("--fault-token-id", type=int, default=None, help=argparse.SUPPRESS)  # tests only
    several = serve.add_argument_group(
        "several processes (hosts), jax.distributed",
        "Start the same command on every host, with its own --process-id. Process 0 serves HTTP (the "
        "flags above are its) and broadcasts each step's requests; the others serve no HTTP.",
    )
    several.add_argument("--coordinator-address", default=None, help="HOST:PORT of process 0 (default: off)")
    several.add_argument("--num-processes", type=int, default=1, help="processes in all (default 1: off)")
    several.add_argument("--process-id", type=int, default=0, help="this process's index, 0 .. N-1")
    add_engine_args(serve)


def _serve(args, cache_dir) -> int:
    from jaxserve.config import DistributedConfig

    try:
        dist = DistributedConfig(args.coordinator_address, args.num_processes, args.process_id)
    except ValueError as e:
        print(f"jaxserve serve: {e}", file=sys.stderr)
        return 2
    multi_gpu_environment(args.tensor_parallel_size, os.environ)  # the engine process inherits it
    if dist.enabled and not dist.is_leader:
        return _follow(args, cache_dir, dist)
    print("jaxserve serve: importing JAX, the engine and the server", flush=True)
    import signal

    from jaxserve.engine.core_client import leave_the_device_to_the_engine
    from jaxserve.server import ServerSettings, create_app
    from jaxserve.server.settings import DEFAULT_MAX_REQUEST_BODY_BYTES

    in_process = ServerSettings.engine_in_process if args.engine_in_process is None else args.engine_in_process
    if not in_process:
        leave_the_device_to_the_engine()  # before JAX is initialised here to pick the plan
    import jax
    import uvicorn

    engine = engine_config(args, plan=default_plan(jax.default_backend()), model=args.model_tag, cache_dir=cache_dir)
    settings = ServerSettings(
        engine=engine,
        served_model_names=tuple(args.served_model_name or ()),
        api_key=args.api_key or os.environ.get("JAXSERVE_API_KEY") or None,
        max_request_body_bytes=args.max_request_body_bytes or DEFAULT_MAX_REQUEST_BODY_BYTES,
        fault_token_id=args.fault_token_id,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
        engine_in_process=in_process,
        distributed=dist,
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


def _add_serve_parser_defaults() -> dict:
    """The serve flags' defaults (to name the HTTP flags a follower was given)."""
    parser = argparse.ArgumentParser()
    _add_serve_parser(parser.add_subparsers(dest="command"))
    return vars(parser.parse_args(["serve"]))


def _follow(args, cache_dir, dist) -> int:
    """Process i > 0 of several: the engine over the shared mesh, no HTTP; it steps as process 0
    broadcasts, and exits when process 0 shuts down."""
    if args.engine_in_process:
        print("jaxserve serve: --engine-in-process cannot join several processes", file=sys.stderr)
        return 2
    http = ("host", "port", "served_model_name", "api_key", "max_request_body_bytes", "enable_auto_tool_choice")
    http += ("tool_call_parser", "uvicorn_log_level")
    defaults = _add_serve_parser_defaults()
    given = [f"--{k.replace('_', '-')}" for k in http if getattr(args, k) != defaults[k]]
    print(
        f"jaxserve serve: process {dist.process_id} of {dist.num_processes}: no HTTP here, joining "
        f"{dist.coordinator_address}"
        + (f"; the HTTP flags given ({', '.join(given)}) apply to process 0 only" if given else ""),
        flush=True,
    )
    from jaxserve.engine import multihost

    multihost.initialize(dist)  # before anything initialises a JAX backend here
    import jax

    engine = engine_config(args, plan=default_plan(jax.default_backend()), model=args.model_tag, cache_dir=cache_dir)
    return multihost.run_follower(engine, dist, fault_token_id=args.fault_token_id)


def _chat(args, cache_dir) -> int:
    import dataclasses

    from jaxserve import LLM, SamplingParams

    # One conversation: the small plan keeps warm-up short on any device.
    config = engine_config(args, plan=CPU_PLAN, log=None, cache_dir=cache_dir)
    llm = LLM(**dataclasses.asdict(config))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    out = llm.chat([{"role": "user", "content": args.message}], params, use_tqdm=False)[0].outputs[0]
    print(f"user: {args.message}")
    print(f"assistant: {out.text.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
