"""Device time of the sampler and of its parts, per row count, for the step's cost model:

    python scripts/bench_sampler.py --rows 16,64,256 --vocab 128256

Each function is jitted, warmed up, launched --iters times back to back and then waited for, so
the figure is device time per call (the sampler has no host synchronisation to stall the launch).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="16,64,256")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxserve.engine import sampler as S
    from jaxserve.sampling_params import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS

    def batch(r: int, cut: bool, sampled: bool, penalties: bool, slots: int) -> S.SamplingBatch:
        f = lambda v: jnp.full((r,), v, jnp.float32)  # noqa: E731
        return S.SamplingBatch(
            temperature=f(0.8 if sampled else 0.0),
            top_k=jnp.full((r,), 50 if cut else args.vocab, jnp.int32),
            top_p=f(0.9 if cut else 1.0),
            min_p=f(0.0),
            repetition_penalty=f(1.1 if penalties else 1.0),
            presence_penalty=f(0.0),
            frequency_penalty=f(0.0),
            bias_row=jnp.full((r,), slots, jnp.int32),  # the table's empty row
            ban_stops=jnp.zeros(r, bool),
            seeds=jnp.arange(r, dtype=jnp.uint32),
            counters=jnp.zeros(r, jnp.int32),
            wants_logprobs=jnp.ones(r, bool),
            processor_mask=jnp.zeros((0, r), bool),
            penalty_row=jnp.arange(r, dtype=jnp.int32) if penalties else jnp.full((r,), slots, jnp.int32),
            reset_rows=jnp.full((r,), slots, jnp.int32),
            token_row=jnp.full((r,), slots, jnp.int32),
            token_is_output=jnp.zeros(r, bool),
        )

    def device_ms(fn, *xs) -> float:
        jax.block_until_ready(fn(*xs))
        t0 = time.perf_counter()
        for _ in range(args.iters):
            out = fn(*xs)
        jax.block_until_ready(out)
        return 1e3 * (time.perf_counter() - t0) / args.iters

    record = dict(device=jax.devices()[0].device_kind, date=time.strftime("%Y-%m-%d"), vocab=args.vocab, results=[])
    for r in (int(x) for x in args.rows.split(",")):
        logits = jax.random.normal(jax.random.key(0), (r, args.vocab), jnp.float32) * 3
        state = S.new_penalty_state(r, args.vocab)
        bias = S.new_logit_bias(r, args.vocab, MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS)
        plain, full = batch(r, False, False, False, r), batch(r, True, True, True, r)
        parts = {
            "read logits (max)": (jax.jit(lambda x: jnp.max(x, axis=-1)), logits),
            "sample: greedy rows": (jax.jit(S.sample), logits, plain, state, bias),
            "sample: top-k/p, penalties, temperature": (jax.jit(S.sample), logits, full, state, bias),
            "sort": (jax.jit(lambda x: jnp.sort(x, axis=-1)), logits),
            "truncate": (jax.jit(S._truncate), logits, full),
            "draw": (jax.jit(S._draw), logits, full),
            "top logprobs": (jax.jit(S.top_logprobs), logits),
            "penalties": (jax.jit(S._apply_penalties), logits, state, full),
        }
        row = dict(rows=r, **{name: round(device_ms(fn, *xs), 4) for name, (fn, *xs) in parts.items()})
        record["results"].append(row)
        print(f"R={r}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in row.items() if k != "rows"), flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
