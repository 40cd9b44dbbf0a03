"""FP8 KV pages on the GPU (issue 19): the compiled kernels checked against their references, then
decode timed against bf16 pages and the copy bandwidth of the same run. One call:

    PYTHONUNBUFFERED=1 python3 scripts/check_fp8_gpu.py --out $OUT

1. the copy bandwidth of this run (PyTorch's device copy where it sees the GPU, else JAX's);
2. the writer: Mosaic GPU against the XLA scatter, bit-exact, for float8_e4m3fn and float8_e5m2;
3. the attention kernel, compiled, on fp8 pages against the f32 reference on the same pages
   (scales != 1): decode, prefill and mixed batches, GQA 1/4/8, head_dim 64/128, pages 16-128,
   the configs picked by shape and a forced split; bf16 q, so within 1e-2 (relative, norm), 3e-2
   where the config rounds q to fp8 too (fp8_qk: FP8_DECODE_CONFIG, picked for decode shapes);
4. each variant of --fp8-variants / --bf16-variants against the reference on the pages it is timed
   on (decode batches: ragged kv lengths, a 1-key row, padding; auto and no kv splits), within 1e-2
   (fp8_qk variants 3e-2: q rounded to fp8 too);
5. decode at batch x 2048 (Llama-3.1-8B heads: 32 q, 8 kv, head_dim 128): bf16 pages and each fp8
   format, the config picked by shape and the variants; bytes read / time / copy bandwidth.
Prints a markdown table last; every number goes to OUT/fp8.json. The two-warpgroup block split
(issue 19), checked and timed on both page kinds:

    PYTHONUNBUFFERED=1 python3 scripts/check_fp8_gpu.py --out $OUT --batches 64,256 --page-sizes 64 \\
        --fp8-variants wgsplit64x4,wgsplit64x6,wgsplit64x8,wgsplit128x2 \\
        --bf16-variants wgsplit64x4,wgsplit64x6,wgsplit128x2

Q.K^T in fp8 (`fp8_qk`: q quantized to e4m3, K straight from the ring, only V widened), fp8 pages
only, beside auto (FP8_DECODE_CONFIG: fp8qk64x8 since 2026-12-07; split128x2 the config before it)
and the widening ablation:

    PYTHONUNBUFFERED=1 python3 scripts/check_fp8_gpu.py --out $OUT --batches 1,64,256 --page-sizes 16 \\
        --variant-checks-only --fp8-variants split128x2,fp8qk,fp8qk1wg --ablate-widen
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.benchmarks.attention_batch import DT, H, K, N, make_batch
from jaxserve.benchmarks.device_limits import copy_bandwidth
from jaxserve.benchmarks.kernel_timing import rel_err, time_chained
from pallas_kernels import config_for, ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.kv_cache_update import write_kv_pages, write_kv_pages_reference
from pallas_kernels.kv_quant import quantize
from pallas_kernels.ragged_paged_attention_config import (
    DECODE_CONFIG,
    FP8_DECODE_CONFIG,
    FP8_DECODE_CONFIG_LARGE_PAGES,
    RaggedPagedAttentionConfig,
)

rpa = importlib.import_module("pallas_kernels.ragged_paged_attention")  # the module (the package exports its function)
FORMATS = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}
VARIANTS = {  # decode configs timed on fp8 pages (--bf16-variants: bf16 too) besides the one picked by shape
    "decode1wg": DECODE_CONFIG,  # bf16 pages' decode config: one compute warpgroup (fp8's before FP8_DECODE_CONFIG)
    "stages4": dataclasses.replace(DECODE_CONFIG, num_stages=4),  # the fp8 ring is half: one more stage fits
    "block64x6": dataclasses.replace(DECODE_CONFIG, block_kv=64, num_stages=6),
    "persist": dataclasses.replace(DECODE_CONFIG, num_programs=None),
    # smaller shared-memory footprints: two programs per SM where registers allow
    "block64x2": dataclasses.replace(DECODE_CONFIG, block_kv=64, num_stages=2),
    "block64x3": dataclasses.replace(DECODE_CONFIG, block_kv=64, num_stages=3),
    "block128x2": dataclasses.replace(DECODE_CONFIG, num_stages=2),
    # two compute warpgroups on the same 64 q rows, each taking every other KV block (split_blocks),
    # merged at the end; even stage counts. Shared memory at H = 128 with kv splits, fp8 / bf16
    # pages: 64 x 4 162 / 162 KiB, 64 x 6 194 / 226, 64 x 8 226 / too much (bf16 fails), 128 x 2 226 / 162
    **{
        f"wgsplit{block}x{stages}": dataclasses.replace(
            DECODE_CONFIG, compute_warpgroups=2, split_blocks=True, block_kv=block, num_stages=stages
        )
        for block, stages in ((64, 4), (64, 6), (64, 8), (128, 2))
    },
    # fp8 pages only: q quantized to e4m3 and Q.K^T in fp8 from the ring, V alone widened. Shared
    # memory at H = 128 with kv splits: 170 / 153 / 202 KiB (K's 16-bit tiles gone, an 8-bit q
    # buffer beside a 16-bit output one)
    "fp8qk": FP8_DECODE_CONFIG_LARGE_PAGES,  # two blocks of 128 in flight
    "fp8qk1wg": dataclasses.replace(DECODE_CONFIG, fp8_qk=True),
    "fp8qk64x8": FP8_DECODE_CONFIG,  # auto's since 2026-12-07
    # auto's before: fp8qk with 16-bit Q.K^T (K widened too)
    "split128x2": dataclasses.replace(FP8_DECODE_CONFIG_LARGE_PAGES, fp8_qk=False),
}
# Against the f32 reference on unquantized q: fp8 q's own rounding on top, 2.4-3.3% relative on the
# worst token of a case (tests/kernels/test_fp8_qk.py); the reference on q quantized as fp8_qk does
# measured 1.0e-2, 1.4e-2 and 2.3e-2 over check_variants' three batches
TOLERANCE, FP8_QK_TOLERANCE = 1e-2, 3e-2
SCALES = dict(k_scale=0.75, v_scale=1.5)


def log(*a):
    print(*a, flush=True)


def check_writer(results):
    key = jax.random.key(5)
    for name, fmt in FORMATS.items():
        pages = quantize(jax.random.normal(key, (64, 64, 8, 128), jnp.float32), 1.0, fmt)
        rows = jax.random.normal(jax.random.key(6), (256, 8, 128), DT) * 50  # some saturate
        slots = jnp.asarray(np.random.default_rng(0).permutation(64 * 64)[:256].astype(np.int32)).at[3].set(-1)
        got = write_kv_pages(pages, pages, rows, rows, slots, 0.125, 0.5)
        want = write_kv_pages_reference(pages, pages, rows, rows, slots, 0.125, 0.5)
        same = all(
            bool(jnp.all(jax.lax.bitcast_convert_type(g, jnp.uint8) == jax.lax.bitcast_convert_type(w, jnp.uint8)))
            for g, w in zip(got, want)
        )
        results["writer"].append(dict(format=name, bit_exact=same))
        log(f"writer {name}: {'bit-exact' if same else 'DIFFERS'} against the XLA scatter")


def check_kernel(results):
    cases = [  # (q_lens, kv_lens, group, head_dim, page_size, config)
        ([1] * 8, [2048, 1, 17, 129, 700, 64, 1000, 333], 4, 128, 16, None),  # decode (auto splits)
        ([1] * 8, [2048, 1, 17, 129, 700, 64, 1000, 333], 8, 128, 64, None),
        ([1] * 4, [900, 31, 2048, 5], 1, 64, 128, None),
        ([512, 77, 1], [512, 600, 1500], 4, 128, 64, None),  # prefill and chunked prefill, mixed
        ([300, 1, 1, 20], [300, 2000, 40, 1020], 8, 64, 32, None),
        ([1, 1, 70, 3], [2000, 5, 70, 130], 4, 128, 16, dataclasses.replace(DECODE_CONFIG, kv_splits=4)),
        ([128, 1], [128, 777], 1, 128, 128, RaggedPagedAttentionConfig(compute_warpgroups=2, pingpong=False)),
    ]
    for name, fmt in FORMATS.items():
        for i, (q_lens, kv_lens, group, head_dim, page_size, config) in enumerate(cases):
            row = dict(format=name, case=i, group=group, head_dim=head_dim, page_size=page_size)
            check_case(row, jax.random.key(i), q_lens, kv_lens, group, head_dim, page_size, fmt, SCALES, config)
            results["correctness"].append(row)
            log(f"kernel {name} case {i} (G={group} H={head_dim} S={page_size}): {row}")


def check_case(row, key, q_lens, kv_lens, group, head_dim, page_size, fmt, scales, config) -> None:
    """One ragged batch (4 KV heads, bf16 q, pages quantized to fmt with scales) through the
    kernel and the f32 reference; the verdict goes into row (ok, rel_err, padding_zero or error)."""
    args = make_batch(
        key,
        q_lens,
        kv_lens,
        num_heads=group * 4,
        num_kv_heads=4,
        head_dim=head_dim,
        page_size=page_size,
        dtype=jnp.float32,
        pad_tokens=5,
    )
    args["q"] = args["q"].astype(DT)
    args["k_pages"] = quantize(args["k_pages"], scales["k_scale"], fmt)
    args["v_pages"] = quantize(args["v_pages"], scales["v_scale"], fmt)
    try:
        out = ragged_paged_attention(**args, **scales, sm_scale=head_dim**-0.5, config=config)
        ref = ragged_paged_attention_reference(**args, **scales, sm_scale=head_dim**-0.5)
        total = sum(q_lens)
        row["rel_err"] = rel_err(out[:total], ref[:total])
        row["padding_zero"] = bool(jnp.all(out[total:] == 0))
        picked = config_for(args["q"], args["k_pages"], args["kv_lens"], config)
        tolerance = FP8_QK_TOLERANCE if picked.fp8_qk else TOLERANCE
        row["ok"] = row["rel_err"] <= tolerance and row["padding_zero"]
    except Exception as e:  # noqa: BLE001
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:600]}")


def check_variants(results, variants, bf16_variants):
    """Each timed variant against the f32 reference on the pages it is timed on (fp8: scales != 1),
    decode batches as timed but ragged: page and block crossings, a 1-key row, padding rows and
    tokens; kv splits picked by shape and none."""
    cases = [  # (q_lens, kv_lens, group, head_dim, page_size, kv_splits)
        ([1] * 8, [2048, 1, 17, 129, 700, 64, 1000, 333], 4, 128, 64, None),
        ([1] * 6, [1500, 65, 2, 128, 257, 999], 8, 128, 16, 1),
        ([1] * 4, [900, 31, 2048, 5], 1, 64, 32, None),
    ]
    for kv_name, fmt in {"bf16": DT, **FORMATS}.items():
        for vname in bf16_variants if kv_name == "bf16" else variants:
            for i, (q_lens, kv_lens, group, head_dim, page_size, splits) in enumerate(cases):
                scales = SCALES if kv_name != "bf16" else dict(k_scale=1.0, v_scale=1.0)
                config = dataclasses.replace(VARIANTS[vname], kv_splits=splits)
                row = dict(variant=vname, pages=kv_name, case=i, group=group, head_dim=head_dim, kv_splits=splits)
                key = jax.random.key(100 + i)
                check_case(row, key, q_lens, kv_lens, group, head_dim, page_size, fmt, scales, config)
                results["correctness"].append(row)
                log(f"variant {vname} {kv_name} case {i}: {row}")


def bench_decode(results, copy_bw, batches, kv_len, page_sizes, variants, save, ablate_widen=False, bf16_variants=()):
    for page_size in page_sizes:
        for b in batches:
            base = make_batch(
                jax.random.key(b),
                [1] * b,
                [kv_len] * b,
                num_heads=N,
                num_kv_heads=K,
                head_dim=H,
                page_size=page_size,
                dtype=DT,
                pad_rows=0,
            )
            names = list(base)
            lens_index = names.index("kv_lens")
            calls = 16 if b * kv_len >= 64 * 2048 else 64
            row = dict(batch=b, kv_len=kv_len, page_size=page_size)
            for kv_name, fmt in {"bf16": DT, **FORMATS}.items():
                args = dict(base)
                if kv_name != "bf16":
                    args["k_pages"] = quantize(base["k_pages"], 1.0, fmt)
                    args["v_pages"] = quantize(base["v_pages"], 1.0, fmt)
                itemsize = jnp.dtype(fmt).itemsize
                nbytes = 2 * b * kv_len * K * H * itemsize + 2 * b * N * H * 2  # pages read, q read, out written
                timed = bf16_variants if kv_name == "bf16" else variants
                configs = {"auto": None} | {v: VARIANTS[v] for v in timed}
                if ablate_widen and kv_name != "bf16":
                    configs["nowiden"] = None
                for cname, cfg in configs.items():
                    fn = lambda *a, cfg=cfg: ragged_paged_attention(*a, sm_scale=H**-0.5, config=cfg)  # noqa: E731
                    key = f"{kv_name}_{cname}"
                    try:
                        with skipped_widening(cname == "nowiden"):
                            t = time_chained(fn, [args[n] for n in names], lens_index, calls)
                        row[key] = dict(us=t * 1e6, bytes=nbytes, of_copy=nbytes / t / copy_bw)
                    except Exception as e:  # noqa: BLE001
                        row[key] = dict(error=f"{type(e).__name__}: {str(e)[:400]}")
                    log(f"decode B={b} kv={kv_len} S={page_size} {key}: {row[key]}")
                del args
            results["decode"].append(row)
            save()
            del base


@contextlib.contextmanager
def skipped_widening(skip: bool):
    """A profile by ablation, for timing only: the kernel traced with its fp8 -> 16-bit widening left
    out (wgmma reads tiles never written), which says what the widening costs beside the rest."""
    if not skip:
        yield
        return
    widen = rpa._widen
    rpa._widen = lambda src, dst: None
    jax.clear_caches()  # the jitted kernel retraced with it, and again after
    try:
        yield
    finally:
        rpa._widen = widen
        jax.clear_caches()


def markdown(results):
    lines = [
        f"device {results['device']}, {results['date']}, copy bandwidth {results['copy_bandwidth'] / 1e12:.2f} TB/s",
        "",
        "| batch x kv | S | pages, config | us | of copy bandwidth |",
        "|---|---|---|---|---|",
    ]
    for row in results["decode"]:
        for key, v in row.items():
            if isinstance(v, dict):
                cell = f"{v['us']:.1f} | {v['of_copy']:.0%}" if "us" in v else f"failed | {v['error'][:60]}"
                lines.append(f"| {row['batch']} x {row['kv_len']} | {row['page_size']} | {key} | {cell} |")
    bad = [r for r in results["correctness"] if not r.get("ok")]
    lines.append("")
    passed = len(results["correctness"]) - len(bad)
    lines.append(
        f"kernel checks: {passed}/{len(results['correctness'])} within {TOLERANCE} (fp8_qk {FP8_QK_TOLERANCE})"
    )
    lines += [f"- failed: {str({k: v for k, v in r.items() if k != 'ok'})[:300]}" for r in bad]
    lines.append(f"writer: {[(w['format'], w['bit_exact']) for w in results['writer']]}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--kv-len", type=int, default=2048)
    ap.add_argument("--page-sizes", default="64,16")
    ap.add_argument("--fp8-variants", default="stages4", help=f"of {list(VARIANTS)}; '' for none")
    ap.add_argument("--bf16-variants", default="", help="variants also timed (and checked) on bf16 pages")
    ap.add_argument("--skip-checks", action="store_true", help="time only: no check at all")
    ap.add_argument(
        "--variant-checks-only",
        action="store_true",
        help="check the timed variants but not the writer and the configs picked by shape (2 and 3 above)",
    )
    ap.add_argument("--ablate-widen", action="store_true", help="also time fp8 pages with the widening left out")
    args = ap.parse_args()
    variants = [v for v in args.fp8_variants.split(",") if v]
    bf16_variants = [v for v in args.bf16_variants.split(",") if v]
    unknown = set(variants + bf16_variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    if fp8_only := [v for v in bf16_variants if VARIANTS[v].fp8_qk]:
        ap.error(f"{fp8_only} need fp8 pages: not --bf16-variants")
    results = dict(
        device=jax.devices()[0].device_kind,
        date=datetime.date.today().isoformat(),
        jax=jax.__version__,
        writer=[],
        correctness=[],
        decode=[],
    )
    results["copy_bandwidth"] = copy_bw = copy_bandwidth()
    log(f"{results['device']}: copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save():  # after each part: a run cut short still leaves what it measured
        (out / "fp8.json").write_text(json.dumps(results, indent=1))

    if not args.skip_checks:
        if not args.variant_checks_only:
            check_writer(results)
            check_kernel(results)
            save()
        check_variants(results, variants, bf16_variants)
        save()
    batches = [int(b) for b in args.batches.split(",")]
    page_sizes = [int(s) for s in args.page_sizes.split(",")]
    bench_decode(results, copy_bw, batches, args.kv_len, page_sizes, variants, save, args.ablate_widen, bf16_variants)
    log(markdown(results))


if __name__ == "__main__":
    main()
