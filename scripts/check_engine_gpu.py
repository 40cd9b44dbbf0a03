"""One GPU-machine call that checks the engine end to end on a random-weight preset:

  1. start-up: load (dummy weights born on the device), bucket plan, KV sizing, warm-up compile;
  2. KV sizing: the cache's token capacity against what gpu_memory_utilization x device memory
     minus the weights could hold at best (the goal is >= 95% of it);
  3. a varied workload (ragged prompts, staggered arrivals, greedy and sampled rows, penalties,
     logprobs, n > 1): every request finishes, and nothing compiles after warm-up;
  4. greedy tokens of the chosen attention against the other implementations, same weights, and
     where they part, the peer's margin between its top two tokens (a tie or a fault?);
  5. a short offline throughput figure.

    python scripts/check_engine_gpu.py --model llama-3.2-1b --out $OUT
    python scripts/check_engine_gpu.py --model FOLDER --load-format auto --out $OUT  # real weights

Real weights make step 4 meaningful (random ones give near-ties everywhere); scripts/shrink_gguf.py
makes a checkpoint small enough to carry to the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from jaxserve.engine_args import add_engine_args, engine_kwargs


def greedy_run(llm, prompts, steps: int = 32) -> list[tuple[list[int], list[float], list[int]]]:
    """Each prompt's greedy tokens, at each step the margin (nats) of the chosen token over the
    runner-up (how far the step was from a tie), and the runner-up's id."""
    from jaxserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, logprobs=2)
    runs = []
    for out in llm.generate(prompts, params, use_tqdm=False):
        done = out.outputs[0]
        margins, second = [], []
        for chosen, top in zip(done.token_ids, done.logprobs):
            rest = {tok: lp.logprob for tok, lp in top.items() if tok != chosen}
            runner_up = max(rest, key=rest.get) if rest else -1
            margins.append(top[chosen].logprob - rest[runner_up] if rest else float("inf"))
            second.append(runner_up)
        runs.append((list(done.token_ids), margins, second))
    return runs


def compare_greedy(ours, theirs, tie: float = 0.125) -> dict:
    """Where two greedy runs of the same prompts part, and how close to a tie the peer was there.
    A parting is a tie when our token was the peer's runner-up and the peer's top token led it by
    at most `tie` nats: bf16 holds logits of magnitude 16 to 32 in steps of 0.125. Anything else
    would be a real fault."""
    equal, margins, ours_was_runner_up, agreed = [], [], [], []
    for (a, _, _), (b, b_margins, b_second) in zip(ours, theirs):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        equal.append(k)
        agreed += b_margins[:k]
        if k < len(a):
            margins.append(round(b_margins[k], 4))
            ours_was_runner_up.append(a[k] == b_second[k])
    return dict(
        steps=len(ours[0][0]),
        equal_prefix=equal,
        peer_margin_where_parted=margins,
        ours_was_peer_runner_up=ours_was_runner_up,
        peer_median_margin_before_parting=round(float(np.median(agreed)), 4) if agreed else None,
        ok=all(m <= tie for m in margins) and all(ours_was_runner_up),
        tie_nats=tie,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--compare-with", default="xla,reference", help="attention implementations to match greedy tokens against"
    )
    defaults = dict(
        model="llama-3.2-1b",
        dtype="bfloat16",
        attention_impl="pallas",
        load_format="dummy",
        max_num_seqs=64,
        max_num_batched_tokens=512,
        max_model_len=4096,
    )
    add_engine_args(p, defaults=defaults)
    p.add_argument("--out", default=".")
    args = p.parse_args()

    import jax

    from jaxserve import LLM, SamplingParams
    from jaxserve.engine.memory_plan import page_bytes

    shown = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    report: dict = {"device": jax.devices()[0].device_kind, "args": shown, "date": time.strftime("%Y-%m-%d")}
    common = {**engine_kwargs(args), "seed": 0}
    for name in ("attention_impl", "gpu_memory_utilization"):  # set below, per engine
        common.pop(name, None)
    t0 = time.perf_counter()
    llm = LLM(attention_impl=args.attention_impl, gpu_memory_utilization=0.9, **common)
    report["startup_seconds"] = time.perf_counter() - t0
    engine = llm.engine
    stats = jax.local_devices()[0].memory_stats() or {}
    weights = sum(a.nbytes for a in jax.tree.leaves(engine.runner.state))
    per_token = page_bytes(engine.runner, 1, engine.runner.kv_cache_dtype)  # the runner has the model config
    capacity = engine.scheduler.kv.num_pages * engine.config.page_size
    if "bytes_limit" in stats:  # a GPU
        ideal = (0.9 * stats["bytes_limit"] - weights) / per_token
        report.update(
            bytes_limit=stats["bytes_limit"],
            weights_bytes=weights,
            kv_tokens=capacity,
            ideal_kv_tokens=int(ideal),
            kv_fraction_of_ideal=capacity / ideal,
        )
        print(
            f"KV capacity {capacity} tokens = {capacity / ideal:.1%} of the {int(ideal)} that 0.9 x memory - weights holds"
        )

    rng = np.random.default_rng(0)
    vocab = engine.model_config.vocab_size
    kinds = [
        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=48, ignore_eos=True),
        SamplingParams(temperature=1.0, repetition_penalty=1.2, frequency_penalty=0.5, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.7, logprobs=5, prompt_logprobs=2, max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=1.0, n=3, max_tokens=20, ignore_eos=True, seed=3),
    ]
    finished, step, t0 = 0, 0, time.perf_counter()
    for i in range(48):
        n = int(rng.integers(1, 600))
        engine.add_request(f"w{i}", {"prompt_token_ids": rng.integers(0, vocab, n).tolist()}, kinds[i % len(kinds)])
        if i % 4 == 3:
            for out in engine.step():
                finished += out.finished
            step += 1
    while engine.has_unfinished_requests():
        for out in engine.step():
            finished += out.finished
    report.update(
        workload_requests_finished=finished,
        workload_seconds=time.perf_counter() - t0,
        compilations_after_warmup=engine.num_compilations_since_warmup,
        engine_stats=engine.stats.summary(),
        free_pages_after=engine.scheduler.kv.num_free_pages,
        num_pages=engine.scheduler.kv.num_pages,
    )
    print(f"workload: {finished}/48 finished, {engine.num_compilations_since_warmup} compilations after warm-up")
    print(engine.stats.summary())

    prompts = [{"prompt_token_ids": rng.integers(0, vocab, n).tolist()} for n in (7, 60, 300, 900)]
    ours = greedy_run(llm, prompts)

    num, inp, outl = 128, 256, 128
    tp_prompts = [{"prompt_token_ids": rng.integers(0, vocab, inp).tolist()} for _ in range(num)]
    t0 = time.perf_counter()
    llm.generate(tp_prompts, SamplingParams(temperature=1.0, max_tokens=outl, ignore_eos=True), use_tqdm=False)
    elapsed = time.perf_counter() - t0
    report.update(
        throughput_output_tokens_per_s=num * outl / elapsed, throughput_workload=f"{num} x {inp} in / {outl} out"
    )
    print(f"throughput ({num} x {inp}/{outl}): {num * outl / elapsed:.0f} output tokens/s; {engine.stats.summary()}")

    del llm, engine
    for other in [o for o in args.compare_with.split(",") if o and o != args.attention_impl]:
        peer = LLM(attention_impl=other, gpu_memory_utilization=0.3, progress=False, **common)
        result = compare_greedy(ours, greedy_run(peer, prompts))
        del peer
        report[f"greedy_vs_{other}"] = result
        print(f"greedy tokens against {other} attention: {result}")
    Path(args.out, "engine_check.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
