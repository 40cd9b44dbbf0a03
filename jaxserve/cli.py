"""`jaxserve` command line. The entry point: the only place that reads the environment.

    jaxserve chat "question" [--model M] [--max-tokens N]   offline greedy chat, prints the answer
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxserve")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="answer one chat message offline (greedy) and print it")
    chat.add_argument("message")
    chat.add_argument("--model", default=None, help="HF folder or preset; default: the embedded SmolLM2-135M-Instruct")
    chat.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    chat.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    cache_dir = os.environ.get("JAXSERVE_CACHE_DIR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # transformers warns that torch is absent; we never need it
    if args.command == "chat":
        return _chat(args, cache_dir)
    return 2


def _chat(args, cache_dir) -> int:
    from jaxserve.default_model import resolve_model
    from jaxserve.engine.greedy import greedy_generate
    from jaxserve.tokenizer import chat_prompt_ids, load_tokenizer
    from models.loading import load_model, resolve_config

    folder = resolve_model(args.model, cache_dir)
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, dtype=args.dtype)
    prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": args.message}])
    eos = set(resolve_config(folder).eos_token_ids) | {tokenizer.eos_token_id}
    out = greedy_generate(model, [prompt], args.max_tokens, eos_token_ids=sorted(eos - {None}))[0]
    print(f"user: {args.message}")
    print(f"assistant: {tokenizer.decode(out, skip_special_tokens=True).strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
