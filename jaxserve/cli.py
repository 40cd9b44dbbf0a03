"""`jaxserve` command line. The entry point: the only place that reads the environment.

    jaxserve chat "question" [--model M] [--max-tokens N] [--temperature T]   one offline chat answer
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
    chat.add_argument("--max-model-len", type=int, default=2048)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    cache_dir = os.environ.get("JAXSERVE_CACHE_DIR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # transformers warns that torch is absent; we never need it
    if args.command == "chat":
        return _chat(args, cache_dir)
    return 2


def _chat(args, cache_dir) -> int:
    from jaxserve import LLM, SamplingParams

    # One conversation: a small bucket plan keeps warm-up short on a CPU.
    llm = LLM(args.model, dtype=args.dtype, cache_dir=cache_dir, max_num_seqs=1, max_num_batched_tokens=128,
              max_model_len=args.max_model_len)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    out = llm.chat([{"role": "user", "content": args.message}], params, use_tqdm=False)[0].outputs[0]
    print(f"user: {args.message}")
    print(f"assistant: {out.text.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
