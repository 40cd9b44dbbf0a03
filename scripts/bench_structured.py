"""The cost of structured outputs: the same prompts run two ways on one engine, and the output
tokens per second and host milliseconds per step of each.

    json_schema         every request constrained by a JSON schema (a list of people: nested
                        objects, bounded strings and integers, enums), temperature 1, max_tokens
                        --output-len; requests end when the grammar completes or at the limit
    unconstrained       the same prompts with ignore_eos and, per request, max_tokens = the length
                        the json_schema run gave it: the same tokens to generate, no grammar

    python scripts/bench_structured.py --input-len 64 --output-len 64 --num-prompts 32      # CPU, SmolLM2
    python scripts/bench_structured.py --model llama-3.1-8b --load-format dummy --dtype bfloat16 \
        --input-len 256 --output-len 256 --num-prompts 256 --max-num-seqs 64 --max-model-len 2048

A model without a tokenizer (a random-weight preset) gets the embedded SmolLM2's (vocabulary 49,152:
the grammar masks the rest of a larger model's vocabulary), unless --tokenizer names another. The
engine flags are `jaxserve serve`'s. Prints one JSON line per mode and a summary table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from datetime import date
from pathlib import Path

from jaxserve.benchmarks.datasets import random_requests
from jaxserve.engine_args import add_engine_args, engine_kwargs

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["engineer", "doctor", "artist", "farmer"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "items": PERSON, "minItems": 8}},
    "required": ["people"],
    "additionalProperties": False,
}


def run(llm, prompts, params, label: str) -> tuple[dict, list[int]]:
    engine = llm.engine
    llm.reset_prefix_cache()  # each run computes its prompts: the same prompts run several times
    before = dataclasses.replace(engine.stats)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    steps = engine.stats.steps - before.steps
    record = dict(
        mode=label,
        num_prompts=len(prompts),
        output_tokens=sum(lengths),
        elapsed=round(elapsed, 3),
        output_tokens_per_second=round(sum(lengths) / elapsed, 1),
        steps=steps,
        host_ms_per_step=round(1e3 * (engine.stats.host_seconds - before.host_seconds) / max(steps, 1), 3),
        wait_ms_per_step=round(1e3 * (engine.stats.wait_seconds - before.wait_seconds) / max(steps, 1), 3),
        finished_by_grammar=sum(o.outputs[0].finish_reason == "stop" for o in outs),
        compilations_after_warmup=engine.num_compilations_since_warmup,
    )
    return record, lengths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="run the two modes this many times, alternating")
    parser.add_argument("--output-json", default=None, help="write the records here")
    add_engine_args(parser)
    args = parser.parse_args(argv)

    import jax

    from jaxserve import LLM, SamplingParams, StructuredOutputsParams

    kwargs = engine_kwargs(args)
    model = kwargs.get("model")
    if model and not kwargs.get("tokenizer") and not Path(model).exists():  # a preset: no tokenizer of its own
        from jaxserve.default_model import default_model_folder

        kwargs["tokenizer"] = str(default_model_folder(progress=False))
        print(f"{model} has no tokenizer: using {kwargs['tokenizer']} (pass --tokenizer to choose)")
    llm = LLM(**kwargs)
    tokenizer = llm.get_tokenizer()
    requests = random_requests(
        args.num_prompts, args.input_len, args.output_len, tokenizer=tokenizer, seed=args.seed or 0
    )
    prompts = [r.prompt for r in requests]
    grammar = StructuredOutputsParams(json=SCHEMA)
    constrained = [
        SamplingParams(
            temperature=1.0, seed=(args.seed or 0) + i, max_tokens=args.output_len, structured_outputs=grammar
        )
        for i in range(len(prompts))
    ]
    records = []
    for repeat in range(args.repeats):  # alternating, so that drift in the machine's load hits both
        record, lengths = run(llm, prompts, constrained, "json_schema")
        matched = [
            SamplingParams(temperature=1.0, seed=(args.seed or 0) + i, max_tokens=n, ignore_eos=True)
            for i, n in enumerate(lengths)
        ]
        records += [dict(record, repeat=repeat), dict(run(llm, prompts, matched, "unconstrained")[0], repeat=repeat)]
    device = str(jax.devices()[0].device_kind)
    for r in records:
        r.update(device=device, date=str(date.today()), max_num_seqs=llm.engine.config.max_num_seqs)
        print(json.dumps(r))
    print(f"\n{'mode':<14} {'output tok/s (median)':>22} {'host ms/step (median)':>22} {'steps':>6}")
    medians = {}
    for mode in ("json_schema", "unconstrained"):
        rs = [r for r in records if r["mode"] == mode]
        medians[mode] = statistics.median(r["output_tokens_per_second"] for r in rs)
        host = statistics.median(r["host_ms_per_step"] for r in rs)
        print(f"{mode:<14} {medians[mode]:>22.1f} {host:>22.2f} {rs[0]['steps']:>6}")
    print(f"json_schema: {100 * medians['json_schema'] / medians['unconstrained']:.1f}% of unconstrained throughput")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
