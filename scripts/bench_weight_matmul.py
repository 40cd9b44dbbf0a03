"""Do 8-bit weights beat bf16 weights at decode shapes? One call on the GPU machine:

    PYTHONUNBUFFERED=1 python3 scripts/bench_weight_matmul.py --output-json $OUT/wmm.json

The decode GEMM y[M, N] = x[M, K] @ W[K, N], W quantized per output channel (int8 q, one f32 scale
per column n: W ~ q * scale[n]), timed four ways for each shape (--shapes KxN,...; Llama-3.1-8B's
per-layer qkv, o_proj, gate+up and down by default) and batch M (--batches):

1. xla_bf16:   x @ W, W bf16, under jax.jit;
2. xla_int8:   (x @ q.astype(bf16)) * scale under jax.jit (XLA's own fused convert);
3. pallas_int8: JAX's Mosaic GPU mixed-type kernel (hopper_mixed_type_matmul_mgpu, int8 x bf16 ->
   bf16) in its orientation: y^T[N, M] = q^T[N, K] (int8, stored transposed once) @ x^T[K, M] (bf16),
   M padded up to the config's n tile (16 at least: an 8-column bf16 tile would need a 16-byte
   swizzle, which Mosaic refuses), then the scale on y^T's rows and the transpose back (XLA);
   a small sweep of TuningConfigs (--sweep full for more), a config that fails to lower is skipped
   and its reason recorded;
4. copy: a device-to-device copy of the bf16 weights' bytes and of the int8 weights' bytes.

Every variant's time is reported beside the time a copy needs to move its weight bytes: GB/s is
weight (+ scale) bytes read per second, copy GB/s counts bytes read + written as bench_kernels
does, and frac_copy = GB/s / copy GB/s (ceiling_ms = bytes / copy GB/s). Each timed run chains one
call per copy of the weights (8 to 64 distinct buffers, adding up to >= 1 GiB where 64 reach it:
neither XLA's CSE nor the L2 cache carries a weight from one call to the next; --copies sets it). Errors: max |y - ref| / max |ref| against the
f32 product of x and the dequantized weights (the 8-bit variants) or the bf16 weights (xla_bf16);
quant_err is the f32 dequantized product against the f32 bf16 product.

--lower-only (any machine, no GPU needed): lowers the Pallas variant for CUDA for every shape,
batch and config and says which lower; exit 0 when at least one config lowers for every case.
On a machine without a GPU the kernel's SM count (it reads jax.extend.backend's default device's
core_count, which CPU devices lack) is given as 132, an H100/H200 SXM's.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import itertools
import json
import math
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mixed

from jaxserve.benchmarks.device_limits import copy_seconds
from jaxserve.benchmarks.kernel_timing import max_rel_err, time_rotating

DEFAULT_SHAPES = "4096x6144,4096x4096,4096x28672,14336x4096"  # qkv, o_proj, gate+up, down (K x N)
DEFAULT_BATCHES = "1,8,16,64"
NUM_SMS = 132  # H100 / H200 SXM: the SM count lowering is given on a machine without a GPU
MIN_TILE_N = 16  # bf16 x^T tiles: 16 columns = 32 bytes, the smallest swizzle Mosaic takes
ROTATE_BYTES = 1 << 30  # weight copies per timed run add up to at least this
MIN_COPIES, MAX_COPIES = 8, 64  # calls chained per timed run (64 keeps small shapes' compiles short)
WG = mixed.MatmulDimension
SWEEPS = {  # (wg_dimension, tile_m, tile_k, max_concurrent_steps)
    "small": list(itertools.product((WG.M, WG.N), (64, 128), (128, 256), (4,))),
    "full": list(itertools.product((WG.M, WG.N), (64, 128), (64, 128, 256), (2, 4, 6))),
}


def log(*a):
    print(*a, flush=True)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'KxN,KxN' -> [(K, N), ...]; positive integers only."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: expected KxN, e.g. 4096x6144")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"bad batches {text!r}: expected positive integers, e.g. 1,8")
    return batches


def quantize_per_channel(w):
    """w [K, N] -> (q int8 [K, N], scale f32 [N]) with w ~ q * scale: scale = max |w[:, n]| / 127
    (1 for an all-zero column, whose q is then 0), q = round(w / scale); |w - q * scale| <= scale / 2."""
    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=0)
    scale = jnp.where(amax > 0, amax / 127, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return q, scale.astype(jnp.float32)


def cta_tile_n(config: mixed.TuningConfig) -> int:
    """Columns of x^T (batch rows) one CTA covers: two warpgroups side by side along n or along m."""
    return config.tile_n * (2 if config.wg_dimension == WG.N else 1)


def padded_batch(m: int, config: mixed.TuningConfig) -> int:
    """The batch padded up to a multiple of the config's CTA n tile (the kernel's divisibility rule)."""
    step = cta_tile_n(config)
    return -(-m // step) * step


def configs_for(batch: int, sweep: str) -> list[mixed.TuningConfig]:
    """Sweep configs for a batch: tile_n the smallest power of two >= 16 that covers the batch
    (with two warpgroups along n, half that but 16 at least), so each weight is read once."""
    configs = []
    for wg, tile_m, tile_k, steps in SWEEPS[sweep]:
        cover = max(MIN_TILE_N, 1 << (batch - 1).bit_length())
        tile_n = max(MIN_TILE_N, cover // 2) if wg == WG.N else cover
        configs.append(
            mixed.TuningConfig(
                tile_m=tile_m,
                tile_n=tile_n,
                tile_k=tile_k,
                max_concurrent_steps=steps,
                epi_tile_n=tile_n,
                epi_tile_m=64,
                wg_dimension=wg,
            )
        )
    return configs


def config_name(c: mixed.TuningConfig) -> str:
    return f"wg{c.wg_dimension}_m{c.tile_m}_n{c.tile_n}_k{c.tile_k}_s{c.max_concurrent_steps}"


def xla_bf16(x, w):
    return x @ w


def xla_int8(x, q, scale):
    return ((x @ q.astype(jnp.bfloat16)) * scale).astype(jnp.bfloat16)


def pallas_int8(x, q_t, scale, *, config):
    """x [M, K] bf16, q_t [N, K] int8 (the weights transposed), scale [N] -> y [M, N] bf16."""
    m = x.shape[0]
    x_t = jnp.pad(x, ((0, padded_batch(m, config) - m), (0, 0))).T  # [K, M_pad]
    y_t = mixed.mixed_matmul_kernel(q_t, x_t, out_dtype=jnp.bfloat16, config=config)  # [N, M_pad]
    return (y_t[:, :m] * scale[:, None]).T.astype(jnp.bfloat16)


@contextlib.contextmanager
def sm_count_for_lowering():
    """The kernel sizes its grid from jax.extend.backend.get_default_device().core_count, which a
    CPU device lacks: off a GPU, give it an H100/H200's 132 while lowering."""
    if jax.devices()[0].platform == "gpu":
        yield
        return
    saved = mixed.backend
    mixed.backend = types.SimpleNamespace(get_default_device=lambda: types.SimpleNamespace(core_count=NUM_SMS))
    try:
        yield
    finally:
        mixed.backend = saved


def lower_pallas(k: int, n: int, m: int, config: mixed.TuningConfig) -> str:
    """The Pallas variant (with its pad, scale and transposes) lowered for CUDA, as text."""
    sd = jax.ShapeDtypeStruct
    args = (sd((m, k), jnp.bfloat16), sd((n, k), jnp.int8), sd((n,), jnp.float32))
    with sm_count_for_lowering():
        fn = jax.jit(functools.partial(pallas_int8, config=config))
        return fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def short_reason(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"


def lower_only(args) -> int:
    failing_cases = 0
    for (k, n), m in itertools.product(args.shapes, args.batches):
        ok = 0
        for config in configs_for(m, args.sweep):
            name = config_name(config)
            try:
                text = lower_pallas(k, n, m, config)
                mark = "wgmma.mma_async" in text
                ok += mark
                log(f"{k}x{n} M={m} pad={padded_batch(m, config)} {name}: lowers" + ("" if mark else " (no wgmma?)"))
            except Exception as e:  # noqa: BLE001 - report and go on with the other configs
                log(f"{k}x{n} M={m} {name}: FAILS {short_reason(e)}")
        failing_cases += ok == 0
        log(f"{k}x{n} M={m}: {ok} configs lower")
    log("every case has a config that lowers" if not failing_cases else f"{failing_cases} cases with no config")
    return 0 if failing_cases == 0 else 1


def copies_for(nbytes: int, copies: int | None = None) -> int:
    if copies:
        return copies
    return min(MAX_COPIES, max(MIN_COPIES, math.ceil(ROTATE_BYTES / nbytes)))


def weight_sets(make, nbytes: int, copies: int | None) -> list[tuple]:
    """Distinct device buffers of the same operands (make() returns a tuple of arrays), one per call."""
    base = make()
    return [base] + [tuple(jnp.copy(a) for a in base) for _ in range(copies_for(nbytes, copies) - 1)]


def run_shape(k, n, args, on_gpu, rows, write):
    key_w, key_x = jax.random.split(jax.random.key(k * 100003 + n))
    w = (jax.random.normal(key_w, (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    q, scale = quantize_per_channel(w)
    q_t = q.T.copy()
    bytes_bf16, bytes_int8 = k * n * 2, k * n + n * 4
    copy_gbps = {}
    for label, nbytes in (("bf16", bytes_bf16), ("int8", bytes_int8)):
        seconds = copy_seconds(nbytes, copies_for(nbytes, args.copies))
        copy_gbps[label] = 2 * nbytes / seconds / 1e9
        row = dict(shape=f"{k}x{n}", batch=None, variant="copy", config=f"{label} weight bytes", ms=seconds * 1e3)
        rows.append(row | dict(bytes=nbytes, gbps=copy_gbps[label], frac_copy=1.0))
        log(f"{k}x{n} copy of {nbytes / 1e6:.1f} MB ({label}): {seconds * 1e3:.4f} ms, {copy_gbps[label]:.0f} GB/s")
    for m in args.batches:
        x = jax.random.normal(jax.random.fold_in(key_x, m), (m, k), jnp.float32).astype(jnp.bfloat16)
        hi = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
        ref_bf16 = hi(x.astype(jnp.float32), w.astype(jnp.float32))
        ref_deq = hi(x.astype(jnp.float32), q.astype(jnp.float32) * scale)
        quant_err = max_rel_err(ref_deq, ref_bf16)
        base = dict(shape=f"{k}x{n}", k=k, n=n, batch=m, quant_err=quant_err)
        cases = [
            ("xla_bf16", "-", m, xla_bf16, lambda: (w,), bytes_bf16, "bf16", ref_bf16),
            ("xla_int8", "-", m, xla_int8, lambda: (q, scale), bytes_int8, "int8", ref_deq),
        ]
        for config in configs_for(m, args.sweep):
            fn = functools.partial(pallas_int8, config=config)
            pad = padded_batch(m, config)
            cases.append(
                ("pallas_int8", config_name(config), pad, fn, lambda: (q_t, scale), bytes_int8, "int8", ref_deq)
            )
        for variant, name, pad, fn, make, nbytes, label, ref in cases:
            row = base | dict(variant=variant, config=name, padded_batch=pad, bytes=nbytes)
            try:
                if variant == "pallas_int8" and not on_gpu:
                    raise RuntimeError("needs a GPU (Mosaic GPU kernel)")
                err = max_rel_err(jax.jit(fn)(x, *make()), ref)  # a config that cannot lower raises here
                seconds = time_rotating(fn, x, weight_sets(make, nbytes, args.copies), repeats=args.repeats)
            except Exception as e:  # noqa: BLE001 - record why and go on with the other variants
                rows.append(row | dict(error=short_reason(e)))
                log(f"{k}x{n} M={m} {variant} {name}: skipped, {short_reason(e)}")
                continue
            gbps = nbytes / seconds / 1e9
            row |= dict(ms=seconds * 1e3, gbps=gbps, copy_gbps=copy_gbps[label], frac_copy=gbps / copy_gbps[label])
            rows.append(row | dict(ceiling_ms=nbytes / copy_gbps[label] / 1e6, err=err))
            log(
                f"{k}x{n} M={m} (pad {pad}) {variant} {name}: {seconds * 1e3:.4f} ms, {gbps:.0f} GB/s "
                f"= {gbps / copy_gbps[label]:.0%} of copy, err {err:.2e} (quant err {quant_err:.2e})"
            )
        write()


def table(rows) -> str:
    lines = ["| shape KxN | M | pad | variant | config | ms | GB/s | of copy | err |", "|---" * 9 + "|"]
    for r in rows:
        if r["variant"] == "copy" or "ms" not in r:
            continue
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['padded_batch']} | {r['variant']} | {r['config']} | {r['ms']:.4f} "
            f"| {r['gbps']:.0f} | {r['frac_copy']:.0%} | {r['err']:.1e} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", type=parse_shapes, default=parse_shapes(DEFAULT_SHAPES), help="KxN,...")
    ap.add_argument("--batches", type=parse_batches, default=parse_batches(DEFAULT_BATCHES))
    ap.add_argument("--sweep", choices=sorted(SWEEPS), default="small", help="Pallas TuningConfigs to try")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per case (median)")
    ap.add_argument("--copies", type=int, default=None, help="weight copies per timed run (default: by size)")
    ap.add_argument("--output-json", type=Path, default=None)
    ap.add_argument("--lower-only", action="store_true", help="lower the Pallas variant for CUDA, run nothing")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.lower_only:
        return lower_only(args)
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    meta = dict(
        device=f"{dev.device_kind} ({dev.platform})",
        jax=jax.__version__,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        sweep=args.sweep,
    )
    log(f"{meta['device']}, JAX {meta['jax']}, {meta['date']}")
    rows: list[dict] = []

    def write():  # after every batch of every shape, so a run cut short still leaves its rows
        if args.output_json:
            args.output_json.write_text(json.dumps(meta | dict(rows=rows), indent=1))

    for k, n in args.shapes:
        run_shape(k, n, args, on_gpu, rows, write)
    write()
    log(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
