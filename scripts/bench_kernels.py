"""Check every kernel against its reference on the GPU, then time it. One call on the GPU machine:

    PYTHONUNBUFFERED=1 python3 scripts/bench_kernels.py --out $OUT

1. ceilings of this run: HBM copy bandwidth (bytes read + written) and the bf16 matmul rate;
2. correctness on the device: random ragged batches (decode and prefill rows mixed, GQA 1/4/8,
   head_dim 64/128, page sizes 16..128), each kernel variant against the f32 reference;
3. greedy tokens of a small random model with attention_impl "reference" and "pallas";
4. decode (Llama-3.1-8B heads, bf16): ours (split-KV picked by shape; persistent; unsplit), JAX's
   deprecated Triton paged_attention and (unless skipped) the jnp reference at batch x kv_len ->
   achieved bandwidth / copy bandwidth; then a sweep of kv_splits on the small batches;
5. causal prefill: TFLOP/s / matmul rate; 6. the K/V page write: the Mosaic GPU writer against
   the XLA scatter (checked equal first).
Prints a markdown table last; full numbers go to OUT/bench.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.benchmarks.attention_batch import DT, H, K, N, make_batch
from jaxserve.benchmarks.device_limits import torch_copy_bandwidth
from jaxserve.benchmarks.kernel_timing import rel_err
from pallas_kernels import (
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv_pages_reference,
)
from pallas_kernels.kv_cache_update import write_kv_pages
from pallas_kernels.ragged_paged_attention_config import DECODE_CONFIG, PREFILL_CONFIG, kv_splits_for
from pallas_kernels.ragged_tiles import max_tiles, plan_tiles, rows_into_cells, rows_to_tokens

VARIANTS = {  # the two configs the public function picks between by shape (DECODE_CONFIG for decode)
    "decode_cfg": DECODE_CONFIG,  # 1 compute warpgroup (64 rows), block_kv 128, 3 stages, a program per item, auto splits
    "decode_persist": dataclasses.replace(DECODE_CONFIG, num_programs=None),  # persistent: one program per SM
    "no_split": dataclasses.replace(DECODE_CONFIG, kv_splits=1),  # the same without splitting the KV length
    "decode_64x6": dataclasses.replace(DECODE_CONFIG, block_kv=64, num_stages=6),  # same bytes in flight, finer
    # 2 compute warpgroups (128 rows) taking turns on the tensor cores, block_kv 128, 2 stages, persistent
    "prefill_cfg": PREFILL_CONFIG,
    "prefill_nopp": dataclasses.replace(PREFILL_CONFIG, pingpong=False),  # both warpgroups free-running
    "prefill_np": dataclasses.replace(PREFILL_CONFIG, num_programs=0),  # one program per item
    "prefill_64x4": dataclasses.replace(PREFILL_CONFIG, block_kv=64, num_stages=4),  # deeper, shorter ring
}
DECODE_VARIANTS = "decode_cfg,decode_persist,no_split"
PREFILL_VARIANTS = "prefill_cfg,prefill_nopp,prefill_np,prefill_64x4"


def log(*a):
    print(*a, flush=True)


def timeit(make_chain, args, *, calls, repeats=5):
    """Median seconds per call of `calls` chained calls unrolled in one jit (each call's input
    depends on the last output through a scalar that is always 0, so XLA neither CSEs nor hoists)."""
    fn = jax.jit(make_chain(calls))
    jax.block_until_ready(fn(*args))  # compile + warm-up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times), times


def zero_from(out):
    return (out.reshape(-1)[0].astype(jnp.float32) > 3e38).astype(jnp.int32)  # 0, unknowable to XLA


def chain_on_lens(call, lens_index):
    """make_chain for a function whose argument `lens_index` is an int32 lengths array."""

    def make(calls):
        def run(*args):
            args = list(args)
            out = None
            for _ in range(calls):
                if out is not None:
                    args[lens_index] = args[lens_index] + zero_from(out)
                out = call(*args)
            return out

        return run

    return make


def ceilings():
    x = jax.random.normal(jax.random.key(0), (1 << 29,), DT)  # 1 GiB
    add = jax.jit(lambda x: x + 1)
    jax.block_until_ready(add(x))
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        y = x
        for _ in range(10):
            y = add(y)
        jax.block_until_ready(y)
        ts.append((time.perf_counter() - t) / 10)
    copy_bw = 2 * x.nbytes / statistics.median(ts)
    del x, y
    a = jax.random.normal(jax.random.key(1), (8192, 8192), DT)
    b = jax.random.normal(jax.random.key(2), (8192, 8192), DT)
    mm = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(mm(a, b))
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10):
            c = mm(a, b)
        jax.block_until_ready(c)
        ts.append((time.perf_counter() - t) / 10)
    return copy_bw, 2 * 8192**3 / statistics.median(ts)


def check_correctness(results, check_variants):
    cases = [  # (q_lens, kv_lens, group, head_dim, page_size)
        ([1, 1, 37, 5, 1, 128], [1, 300, 37, 2048, 17, 640], 4, 128, 16),
        ([1] * 9 + [200], [513, 1, 64, 65, 127, 128, 129, 1000, 2000, 400], 8, 128, 64),
        ([3, 1, 70, 1], [3, 900, 70, 33], 1, 64, 128),
        ([16, 1, 1], [2048, 2047, 5], 4, 64, 32),
    ]
    worst = 0.0
    for i, (q_lens, kv_lens, group, head_dim, page_size) in enumerate(cases):
        args = make_batch(
            jax.random.key(10 + i),
            q_lens,
            kv_lens,
            num_heads=2 * group,
            num_kv_heads=2,
            head_dim=head_dim,
            page_size=page_size,
            dtype=DT,
            pad_tokens=5,
        )
        f32 = {k: (v.astype(jnp.float32) if v.dtype == DT else v) for k, v in args.items()}
        ref = ragged_paged_attention_reference(**f32, sm_scale=head_dim**-0.5)
        extra = [
            ("split5", dataclasses.replace(PREFILL_CONFIG, kv_splits=5)),
            ("split5_pp_3prog", dataclasses.replace(PREFILL_CONFIG, kv_splits=5, pingpong=True, num_programs=3)),
        ]
        for name, cfg in [(n, c) for n, c in VARIANTS.items() if n in check_variants] + extra:
            try:
                out = ragged_paged_attention(**args, sm_scale=head_dim**-0.5, config=cfg)
                err = rel_err(out, ref)
                padding_zero = bool(np.all(np.asarray(out[sum(q_lens) :], np.float32) == 0))
            except Exception as e:  # noqa: BLE001 - report and go on with the other variants
                err, padding_zero = float("nan"), False
                log(f"  case {i} {name}: FAILED {type(e).__name__}: {str(e)[:400]}")
            ok = err <= 1e-2 and padding_zero
            worst = max(worst, err) if ok else float("inf")
            results["correctness"].append(dict(case=i, variant=name, rel_err=err, ok=ok))
            log(f"  case {i} G={group} H={head_dim} S={page_size} {name}: rel err {err:.2e} {'ok' if ok else 'BAD'}")
        # The reference in bf16 against f32, to show the rounding floor of bf16 inputs.
        results["correctness"].append(
            dict(
                case=i,
                variant="reference_bf16",
                rel_err=rel_err(ragged_paged_attention_reference(**args, sm_scale=head_dim**-0.5), ref),
            )
        )
    return worst


def check_greedy(results):
    """Same greedy tokens from a small random bf16 model with either attention implementation."""
    from jaxserve.testing.greedy import greedy_generate
    from models.config import ModelConfig
    from models.llama import create_model

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = dict(
        architecture="LlamaForCausalLM",
        vocab_size=512,
        hidden_size=512,
        intermediate_size=1024,
        num_layers=2,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        tie_word_embeddings=False,
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        max_position_embeddings=4096,
        sliding_window=None,
        bos_token_id=None,
        eos_token_ids=(),
        dtype="bfloat16",
    )
    cfg = ModelConfig(**{k: v for k, v in cfg.items() if k in fields})
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 512, n).tolist() for n in (5, 70, 200, 1)]
    tokens = {}
    for impl in ("reference", "pallas"):
        model = create_model(cfg, dtype=jnp.bfloat16, attention_impl=impl, seed=0)
        tokens[impl] = greedy_generate(model, prompts, 24)
    first_diff = [
        next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        for a, b in zip(tokens["reference"], tokens["pallas"])
    ]
    same = all(d is None or d >= 8 for d in first_diff)  # bf16 random model: late near-ties happen
    results["greedy"] = dict(same_first_8=same, first_divergence=first_diff, tokens=tokens)
    log(
        f"  greedy tokens identical over the first 8 new tokens: {same}; first divergence per prompt "
        f"(of 24, None = identical): {first_diff}"
    )
    if not same:
        for a, b in zip(tokens["reference"], tokens["pallas"]):
            log(f"    ref {a}\n    pal {b}")
    return same


def deprecated_paged_attention():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import paged_attention
    return paged_attention.paged_attention


def xla_ops_only(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs):
    """The XLA ops the public function runs around the kernel for a decode-shaped batch (tile plan,
    q gather into cells, output gather back), without the kernel: the floor they set per call."""
    num_tokens, num_heads, _ = q.shape
    num_kv_heads, num_rows = k_pages.shape[2], kv_lens.shape[0]
    group, rows_per_tile = num_heads // num_kv_heads, 64 * DECODE_CONFIG.compute_warpgroups
    tiles = max_tiles(num_tokens, num_rows, group, rows_per_tile)
    *plan, cell_src, row_cell = plan_tiles(
        cu_q_lens, num_seqs, group=group, rows_per_tile=rows_per_tile, num_tiles=tiles, num_tokens=num_tokens
    )
    qg = rows_into_cells(q, cell_src, num_kv_heads)
    used = sum(x.sum() for x in plan) + kv_lens.sum() + page_table[0, 0]  # keep every plan output live
    out = rows_to_tokens(jnp.where(used == -12345, 0, qg)[:, row_cell], num_tokens, num_heads)
    valid = jnp.arange(num_tokens) < cu_q_lens[num_seqs[0]]
    return jnp.where(valid[:, None, None], out, jnp.zeros((), q.dtype))


def bench_decode(results, copy_bw, batches, kv_lens_list, page_size, variants, with_peers, with_reference):
    old = deprecated_paged_attention() if with_peers else None
    for b in batches:
        for kv in kv_lens_list:
            args = make_batch(
                jax.random.key(b * 7 + kv),
                [1] * b,
                [kv] * b,
                num_heads=N,
                num_kv_heads=K,
                head_dim=H,
                page_size=page_size,
                dtype=DT,
                pad_rows=0,
            )
            nbytes = 2 * b * kv * K * H * 2 + 2 * b * N * H * 2  # K/V pages read + q read + out written
            row = dict(batch=b, kv_len=kv, page_size=page_size, bytes=nbytes)
            names = list(args)
            lens_index = names.index("kv_lens")
            calls = 16 if b * kv >= 64 * 2048 else 64
            for vname in variants:
                cfg = VARIANTS[vname]
                fn = lambda *a, cfg=cfg: ragged_paged_attention(*a, sm_scale=H**-0.5, config=cfg)  # noqa: E731
                try:
                    t, _ = timeit(chain_on_lens(fn, lens_index), [args[n] for n in names], calls=calls)
                    row[vname] = t
                except Exception as e:  # noqa: BLE001
                    log(f"  decode {b}x{kv} {vname}: FAILED {type(e).__name__}: {str(e)[:300]}")
            try:
                row["xla_ops"], _ = timeit(
                    chain_on_lens(xla_ops_only, lens_index), [args[n] for n in names], calls=calls
                )
            except Exception as e:  # noqa: BLE001
                log(f"  decode {b}x{kv} xla_ops: FAILED {type(e).__name__}: {str(e)[:300]}")
            if with_peers and with_reference:
                ref = lambda *a: ragged_paged_attention_reference(*a, sm_scale=H**-0.5)  # noqa: E731
                try:
                    row["reference"], _ = timeit(
                        chain_on_lens(ref, lens_index),
                        [args[n] for n in names],
                        calls=2 if b * kv >= 64 * 8192 else 4,
                        repeats=3,
                    )
                except Exception as e:  # noqa: BLE001
                    log(f"  decode {b}x{kv} reference: FAILED {type(e).__name__}: {str(e)[:300]}")
            if with_peers:
                # The deprecated kernel wants [K, P, S, H] pages and plain per-sequence lengths.
                kp = args["k_pages"].transpose(2, 0, 1, 3)
                vp = args["v_pages"].transpose(2, 0, 1, 3)
                pps = args["page_table"].shape[1]
                splits = math.gcd(16, pps)
                ppcb = math.gcd(max(1, 128 // page_size), pps // splits)

                def dep(q, kp, vp, bt, ln, splits=splits, ppcb=ppcb):
                    return old(q, kp, vp, bt, ln, k_splits=splits, pages_per_compute_block=ppcb)

                try:
                    out = dep(args["q"], kp, vp, args["page_table"], args["kv_lens"])
                    ours = ragged_paged_attention(**args, sm_scale=1.0)
                    row["deprecated_err"] = rel_err(out, ours)  # both unscaled: the old kernel has no sm_scale
                    row["deprecated"], _ = timeit(
                        chain_on_lens(dep, 4), [args["q"], kp, vp, args["page_table"], args["kv_lens"]], calls=calls
                    )
                except Exception as e:  # noqa: BLE001
                    log(f"  decode {b}x{kv} deprecated: FAILED {type(e).__name__}: {str(e)[:300]}")
                del kp, vp
            del args
            msg = " ".join(
                f"{k}={v * 1e6:.1f}us({nbytes / v / copy_bw:.0%})"
                for k, v in row.items()
                if k in VARIANTS or k in ("reference", "deprecated")
            )
            msg += f" xla_ops_only={row.get('xla_ops', float('nan')) * 1e6:.1f}us"
            log(f"  decode B={b} kv={kv} S={page_size}: {msg}")
            results["decode"].append(row)


def bench_prefill(results, mm_rate, variants):
    for seqs, length in ((1, 2048), (8, 512)):
        args = make_batch(
            jax.random.key(seqs),
            [length] * seqs,
            [length] * seqs,
            num_heads=N,
            num_kv_heads=K,
            head_dim=H,
            page_size=64,
            dtype=DT,
            pad_rows=0,
        )
        flops = seqs * 4 * N * H * length * (length + 1) // 2  # QK and PV over the causal triangle
        row = dict(seqs=seqs, q_len=length, flops=flops)
        names = list(args)
        for vname in variants:
            cfg = VARIANTS[vname]
            fn = lambda *a, cfg=cfg: ragged_paged_attention(*a, sm_scale=H**-0.5, config=cfg)  # noqa: E731
            try:
                row[vname], _ = timeit(chain_on_lens(fn, names.index("kv_lens")), [args[n] for n in names], calls=16)
            except Exception as e:  # noqa: BLE001
                log(f"  prefill {seqs}x{length} {vname}: FAILED {type(e).__name__}: {str(e)[:300]}")
        ref = lambda *a: ragged_paged_attention_reference(*a, sm_scale=H**-0.5)  # noqa: E731
        row["reference"], _ = timeit(
            chain_on_lens(ref, names.index("kv_lens")), [args[n] for n in names], calls=2, repeats=3
        )
        msg = " ".join(
            f"{k}={v * 1e6:.1f}us({flops / v / 1e12:.0f}TF,{flops / v / mm_rate:.0%})"
            for k, v in row.items()
            if k in VARIANTS or k == "reference"
        )
        log(f"  prefill {seqs}x{length}: {msg}")
        results["prefill"].append(row)


def bench_split_sweep(results, copy_bw, shapes, split_list, page_size=64):
    """decode_cfg with each kv_splits at a few small-batch shapes (what `default_splits` is tuned on)."""
    for b, kv in shapes:
        args = make_batch(
            jax.random.key(b * 7 + kv),
            [1] * b,
            [kv] * b,
            num_heads=N,
            num_kv_heads=K,
            head_dim=H,
            page_size=page_size,
            dtype=DT,
            pad_rows=0,
        )
        nbytes = 2 * b * kv * K * H * 2 + 2 * b * N * H * 2
        names = list(args)
        auto = kv_splits_for(DECODE_CONFIG, b, b, K, args["page_table"].shape[1], page_size, group=N // K)
        row = dict(batch=b, kv_len=kv, auto=auto, times={})
        for sp in split_list:
            if b * K * sp > 4096:
                continue
            cfg = dataclasses.replace(DECODE_CONFIG, kv_splits=sp)
            fn = lambda *a, cfg=cfg: ragged_paged_attention(*a, sm_scale=H**-0.5, config=cfg)  # noqa: E731
            try:
                row["times"][sp], _ = timeit(
                    chain_on_lens(fn, names.index("kv_lens")),
                    [args[n] for n in names],
                    calls=16 if b * kv >= 64 * 2048 else 64,
                )
            except Exception as e:  # noqa: BLE001
                log(f"  sweep {b}x{kv} splits {sp}: FAILED {type(e).__name__}: {str(e)[:300]}")
        del args
        log(
            f"  splits B={b} kv={kv} (auto {auto}): "
            + " ".join(f"{sp}={t * 1e6:.1f}us({nbytes / t / copy_bw:.0%})" for sp, t in row["times"].items())
        )
        results["split_sweep"].append(row)


def bench_kv_write(results, copy_bw, calls=16):
    """The Mosaic GPU writer against the XLA scatter, both in place: `calls` writes chained in one
    donating jit (each to its own random slots, one padding token each), so the time is the device's,
    not one host dispatch per write. One layer's K and V."""
    num_pages, page_size = 8192, 64
    for tokens in (64, 256, 512, 2048):
        key = jax.random.key(3)
        new_k = jax.random.normal(key, (tokens, K, H), DT)
        new_v = new_k * 2
        slots = jax.random.permutation(key, num_pages * page_size)[: calls * tokens].astype(jnp.int32)
        slots = slots.reshape(calls, tokens).at[:, tokens // 3].set(num_pages * page_size)  # padding: dropped
        nbytes = 2 * 2 * tokens * K * H * 2  # new rows read, page rows written, K and V
        row = dict(tokens=tokens, bytes=nbytes)
        impls = {
            "xla_scatter": write_kv_pages_reference,
            "pallas_writer": write_kv_pages,
            "pallas_writer_tb32": functools.partial(write_kv_pages, tokens_per_block=32),
        }
        sums = {}
        for name, impl in impls.items():

            def chain(kp, vp, k, v, s, n, impl=impl):
                for i in range(n):
                    kp, vp = impl(kp, vp, k, v, s[i])
                return kp, vp

            kp = jax.random.normal(jax.random.key(4), (num_pages, page_size, K, H), DT)
            vp = kp + 1
            one = jax.jit(functools.partial(chain, n=1), donate_argnums=(0, 1))
            kp, vp = one(kp, vp, new_k, new_v, slots)
            sums[name] = (float(kp.astype(jnp.float32).sum()), float(vp.astype(jnp.float32).sum()))
            many = jax.jit(functools.partial(chain, n=calls), donate_argnums=(0, 1))
            kp, vp = many(kp, vp, new_k, new_v, slots)  # compile + warm-up
            jax.block_until_ready(kp)
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                kp, vp = many(kp, vp, new_k, new_v, slots)
                jax.block_until_ready(kp)
                ts.append((time.perf_counter() - t) / calls)
            row[name] = statistics.median(ts)
            del kp, vp
        row["same_result"] = all(v == sums["xla_scatter"] for v in sums.values())
        results["kv_write"].append(row)
        log(
            f"  kv write T={tokens}: "
            + " ".join(f"{n}={row[n] * 1e6:.1f}us({nbytes / row[n] / 1e9:.0f} GB/s)" for n in impls)
            + f"; same pages after one write: {row['same_result']}"
        )


def markdown(results):
    copy_bw, mm = results["copy_bw"], results["matmul_rate"]
    lines = [
        f"Device: {results['device']}; {results['date']}; JAX {jax.__version__}. "
        f"Copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write; the higher of XLA "
        f"{results.get('xla_copy_bw', 0) / 1e12:.2f} and torch {(results.get('torch_copy_bw') or 0) / 1e12:.2f}), "
        f"bf16 matmul {mm / 1e12:.0f} TFLOP/s, this run.",
        "",
    ]
    variants = [v for v in VARIANTS if any(v in r for r in results["decode"])]
    head = (
        ["batch", "kv_len", "S"]
        + [f"{v} us (% copy)" for v in variants]
        + ["deprecated us (%)", "reference us (%)", "best / deprecated", "XLA ops alone us"]
    )
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["decode"]:
        cells = [str(r["batch"]), str(r["kv_len"]), str(r["page_size"])]
        for v in variants + ["deprecated", "reference"]:
            t = r.get(v)
            cells.append(f"{t * 1e6:.1f} ({r['bytes'] / t / copy_bw:.0%})" if t else "-")
        best = min((r[v] for v in variants if v in r), default=None)
        cells.append(f"{r['deprecated'] / best:.2f}x" if best and r.get("deprecated") else "-")
        cells.append(f"{r['xla_ops'] * 1e6:.1f}" if r.get("xla_ops") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    pvariants = [v for v in VARIANTS if any(v in r for r in results["prefill"])]
    lines += [
        "",
        "| prefill | " + " | ".join(f"{v} us (TFLOP/s, % matmul)" for v in pvariants + ["reference"]) + " |",
        "|---|" + "---|" * (len(pvariants) + 1),
    ]
    for r in results["prefill"]:
        cells = [f"{r['seqs']} x {r['q_len']}"]
        for v in pvariants + ["reference"]:
            t = r.get(v)
            cells.append(f"{t * 1e6:.1f} ({r['flops'] / t / 1e12:.0f}, {r['flops'] / t / mm:.0%})" if t else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if results["split_sweep"]:
        splits = sorted({sp for r in results["split_sweep"] for sp in r["times"]})
        lines += [
            "",
            "| batch x kv_len (auto) | " + " | ".join(f"splits {sp} us" for sp in splits) + " |",
            "|---|" + "---|" * len(splits),
        ]
        for r in results["split_sweep"]:
            lines.append(
                f"| {r['batch']} x {r['kv_len']} ({r['auto']}) | "
                + " | ".join(f"{r['times'][sp] * 1e6:.1f}" if sp in r["times"] else "-" for sp in splits)
                + " |"
            )
    if results["kv_write"]:
        names = ("xla_scatter", "pallas_writer", "pallas_writer_tb32")
        lines += [
            "",
            "| K/V write tokens | " + " | ".join(f"{n} us (GB/s)" for n in names) + " | same pages |",
            "|---|---|---|---|---|",
        ]
        for r in results["kv_write"]:
            lines.append(
                f"| {r['tokens']} | "
                + " | ".join(f"{r[n] * 1e6:.1f} ({r['bytes'] / r[n] / 1e9:.0f})" for n in names)
                + f" | {r['same_result']} |"
            )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument(
        "--skip", default="", help="comma list of: check,greedy,decode,sweep,prefill,kvwrite,peers,reference"
    )
    ap.add_argument("--variants", default=DECODE_VARIANTS, help="decode variants")
    ap.add_argument("--prefill-variants", default=PREFILL_VARIANTS)
    ap.add_argument("--check-variants", default=",".join(VARIANTS), help="variants checked against the reference")
    ap.add_argument(
        "--sweep", default="1x2048,1x8192,8x512,8x2048,8x8192,64x2048", help="batch x kv_len for the split sweep"
    )
    ap.add_argument("--splits", default="1,2,4,8,16,32")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--kv-lens", default="512,2048,8192")
    ap.add_argument("--page-sizes", default="64")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    variants = args.variants.split(",")
    dev = jax.devices()[0]
    results = dict(
        device=f"{dev.device_kind} ({dev.platform})",
        date=datetime.date.today().isoformat(),
        command=" ".join(sys.argv),
        correctness=[],
        decode=[],
        prefill=[],
        kv_write=[],
        split_sweep=[],
    )
    out = Path(args.out)
    torch_bw = torch_copy_bandwidth()
    log(f"device {results['device']}, jax {jax.__version__}")
    xla_bw, mm = ceilings()
    copy_bw = max(xla_bw, torch_bw or 0)  # the higher ceiling: fractions are not flattered
    results.update(copy_bw=copy_bw, xla_copy_bw=xla_bw, torch_copy_bw=torch_bw, matmul_rate=mm)
    log(
        f"copy bandwidth: XLA add {xla_bw / 1e12:.2f} TB/s, torch copy_ {(torch_bw or 0) / 1e12:.2f} TB/s; "
        f"bf16 matmul {mm / 1e12:.0f} TFLOP/s"
    )
    try:
        if "check" not in skip:
            log("correctness (bf16 on the device vs the f32 reference):")
            results["worst_rel_err"] = check_correctness(results, set(args.check_variants.split(",")))
        if "greedy" not in skip:
            check_greedy(results)
        if "prefill" not in skip:
            log("prefill:")
            bench_prefill(results, mm, args.prefill_variants.split(","))
        if "decode" not in skip:
            log("decode:")
            for s in map(int, args.page_sizes.split(",")):
                bench_decode(
                    results,
                    copy_bw,
                    list(map(int, args.batches.split(","))),
                    list(map(int, args.kv_lens.split(","))),
                    s,
                    variants,
                    "peers" not in skip,
                    "reference" not in skip,
                )
        if "sweep" not in skip:
            log("kv splits sweep (decode_cfg):")
            shapes = [tuple(map(int, x.split("x"))) for x in args.sweep.split(",") if x]
            bench_split_sweep(results, copy_bw, shapes, list(map(int, args.splits.split(","))))
        if "kvwrite" not in skip:
            log("K/V page write:")
            bench_kv_write(results, copy_bw)
    finally:
        (out / "bench.json").write_text(json.dumps(results, indent=1, default=str))
        table = markdown(results)
        (out / "bench.md").write_text(table + "\n")
        log(table)


if __name__ == "__main__":
    main()
