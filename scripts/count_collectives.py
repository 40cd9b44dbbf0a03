"""The collectives of a tensor-parallel decode step, read from the compiled programs' HLO.

For each of --tensor-parallel-sizes, the engine is built (random weights) with a one-shape plan (16
tokens, 1 row: a batch-1 decode step), and the optimized HLO of its model and sampler programs is
searched for collectives: all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all
(their -start halves where XLA made them asynchronous). Printed per program: the count of each,
the count per decoder layer, and the bytes each moves (the largest operand, as HLO types it).

Counting needs no GPU: on the CPU with fake devices XLA's SPMD partitioner inserts the same
collectives a GPU's does (the GPU may then combine or overlap them: what they cost needs a GPU
trace, scripts/profile_step.py). A Megatron-style layer needs two all-reduces of [T, D] (after the
attention's output projection and after the MLP's down projection); anything beyond that is a
place to look.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/count_collectives.py \\
        --model llama-3.2-1b --tensor-parallel-sizes 1,2,4,8 --output-json collectives.json
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter

from jaxserve.benchmarks.collectives import Collective, collectives
from jaxserve.engine_args import add_engine_args, engine_kwargs

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax is imported


def summarize(found: list[Collective], num_layers: int) -> dict:
    """Per kind: how many, how many per decoder layer, the distinct sizes in bytes."""
    counts = Counter(c.kind for c in found)
    return {
        kind: {
            "count": counts[kind],
            "per_layer": round(counts[kind] / num_layers, 2),
            "bytes": sorted({c.nbytes for c in found if c.kind == kind}),
        }
        for kind in counts
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensor-parallel-sizes", default="1,2,4,8")
    p.add_argument("--output-json", default=None)
    # a batch-1 decode step: one 16-token, 1-row shape; random weights, no executable cache
    plan = dict(max_num_seqs=1, max_num_batched_tokens=16, min_token_bucket=16, max_model_len=256, num_kv_pages=64)
    defaults = dict(model="llama-3.2-1b", load_format="dummy", dtype="bfloat16", attention_impl="xla")
    add_engine_args(p, defaults={**defaults, **plan, "executable_cache": False}, skip=("tensor_parallel_size",))
    args = p.parse_args()

    import jax

    from jaxserve.config import EngineConfig
    from jaxserve.engine.llm_engine import LLMEngine

    print(f"{jax.device_count()} {jax.default_backend()} devices")
    results = []
    for tp in [int(x) for x in args.tensor_parallel_sizes.split(",")]:
        config = EngineConfig(**engine_kwargs(args), tensor_parallel_size=tp)
        engine = LLMEngine(config, progress=False, log=lambda *a, **k: None)
        runner = engine.runner
        num_layers = runner.config.num_layers
        row = {"tensor_parallel_size": tp, "model": config.model, "num_layers": num_layers, "programs": {}}
        for shape, compiled in runner.compiled_steps.items():
            for name in ("model", "sampler"):
                found = collectives(getattr(compiled, name).as_text())
                row["programs"][f"{name} {shape}"] = summarize(found, num_layers)
        results.append(row)
        print(f"tp {tp}:")
        for program, kinds in row["programs"].items():
            text = "; ".join(
                f"{kind} x{v['count']} ({v['per_layer']}/layer, bytes {v['bytes']})" for kind, v in kinds.items()
            )
            print(f"   {program}: {text or 'none'}")
        del engine
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.output_json}")


if __name__ == "__main__":
    main()
