"""scripts/bench_weight_matmul.py on the CPU: the per-channel int8 quantization, the batch padding,
the XLA int8 variant against the f32 reference, the Pallas variant lowered for CUDA (it only runs
on a GPU), argument parsing and a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.benchmarks.kernel_timing import max_rel_err

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wmm():
    spec = importlib.util.spec_from_file_location("bench_weight_matmul", ROOT / "scripts" / "bench_weight_matmul.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quantize_round_trip_within_half_a_step_per_column(wmm):
    w = np.random.default_rng(0).normal(size=(64, 48)).astype(np.float32) * np.linspace(0.01, 3, 48)
    q, scale = wmm.quantize_per_channel(w)
    q, scale = np.asarray(q), np.asarray(scale)
    assert q.dtype == np.int8 and q.shape == w.shape and scale.shape == (48,) and scale.dtype == np.float32
    assert np.abs(q).max() == 127 and np.abs(q.astype(np.int32)).max(axis=0).min() == 127  # every column
    np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / 127, rtol=1e-6)
    assert np.all(np.abs(w - q * scale) <= scale / 2 * (1 + 1e-5))


def test_quantize_scale_is_per_output_channel_and_zero_columns_stay_zero(wmm):
    w = np.random.default_rng(1).normal(size=(32, 8)).astype(np.float32)
    w[:, 3] = 0
    q, scale = map(np.asarray, wmm.quantize_per_channel(w))
    assert np.all(np.isfinite(scale)) and scale[3] > 0 and np.all(q[:, 3] == 0)
    w2 = w.copy()
    w2[:, 5] *= 10  # one output channel 10x larger: its scale alone changes, its codes do not
    q2, scale2 = map(np.asarray, wmm.quantize_per_channel(w2))
    np.testing.assert_allclose(scale2[5], 10 * scale[5], rtol=1e-6)
    np.testing.assert_array_equal(np.delete(scale2, 5), np.delete(scale, 5))
    np.testing.assert_array_equal(q2, q)


def test_batch_padding(wmm):
    mixed = wmm.mixed
    wg_m = mixed.TuningConfig(
        tile_m=64, tile_n=16, tile_k=128, max_concurrent_steps=4, wg_dimension=mixed.MatmulDimension.M
    )
    wg_n = mixed.TuningConfig(
        tile_m=64, tile_n=16, tile_k=128, max_concurrent_steps=4, wg_dimension=mixed.MatmulDimension.N
    )
    assert [wmm.padded_batch(m, wg_m) for m in (1, 8, 16, 17)] == [16, 16, 16, 32]
    assert [wmm.padded_batch(m, wg_n) for m in (1, 32, 33)] == [32, 32, 64]
    for batch in (1, 8, 16, 20, 64, 100):
        for config in wmm.configs_for(batch, "full"):
            pad = wmm.padded_batch(batch, config)
            assert config.tile_n >= wmm.MIN_TILE_N and config.epi_tile_n == config.tile_n
            assert pad >= batch and pad % wmm.cta_tile_n(config) == 0
            assert pad == max(wmm.cta_tile_n(config), 1 << (batch - 1).bit_length())  # one n tile: W read once
    assert {c.tile_n for c in wmm.configs_for(1, "small")} == {16}  # the smallest the kernel takes


@pytest.mark.parametrize("m,k,n", [(1, 64, 96), (5, 128, 32)])
def test_xla_int8_matches_the_dequantized_f32_product(wmm, m, k, n):
    kx, kw = jax.random.split(jax.random.key(m))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    q, scale = wmm.quantize_per_channel(w)
    ref = np.asarray(x, np.float32) @ (np.asarray(q, np.float32) * np.asarray(scale))
    out = jax.jit(wmm.xla_int8)(x, q, scale)
    assert out.dtype == jnp.bfloat16 and out.shape == (m, n)
    assert max_rel_err(out, ref) < 1e-2  # bf16 output rounding
    quant = max_rel_err(ref, np.asarray(x, np.float32) @ np.asarray(w, np.float32))
    assert 0 < quant < 0.05


def test_pallas_variant_lowers_for_cuda_on_the_cpu(wmm):
    """The Mosaic kernel's inline PTX: bf16 wgmma on the int8 weights widened in registers, n = the
    16-column tile batch 1 is padded to."""
    config = wmm.configs_for(1, "small")[0]
    text = wmm.lower_pallas(256, 256, 1, config)
    assert "mosaic_gpu" in text
    assert "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16" in text
    assert wmm.mixed.backend is jax.extend.backend  # the SM count patch undone


@pytest.mark.skipif(jax.devices()[0].platform == "gpu", reason="what a CPU device lacks")
def test_without_an_sm_count_the_kernel_does_not_lower_on_the_cpu(wmm):
    config = wmm.configs_for(1, "small")[0]
    sd = jax.ShapeDtypeStruct

    def fn(a, b):
        return wmm.mixed.mixed_matmul_kernel(a, b, out_dtype=jnp.bfloat16, config=config)

    assert not hasattr(jax.devices()[0], "core_count")
    with pytest.raises(AttributeError):  # a bare one, from `get_default_device().core_count`
        jax.jit(fn).trace(sd((256, 256), jnp.int8), sd((256, 16), jnp.bfloat16)).lower(lowering_platforms=("cuda",))


def test_lower_only_exits_0(wmm, capsys):
    assert wmm.main(["--lower-only", "--shapes", "256x256", "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "256x256 M=1 pad=16 wgM_m64_n16_k128_s4: lowers" in out and "every case has a config" in out


@pytest.mark.parametrize(
    "argv", [["--shapes", "4096"], ["--shapes", "4096x0"], ["--shapes", "ax4"], ["--shapes", ""], ["--batches", "0"]]
)
def test_bad_arguments_are_rejected(wmm, argv):
    with pytest.raises(SystemExit):
        wmm.build_parser().parse_args(argv)


def test_parses_shapes_and_batches(wmm):
    args = wmm.build_parser().parse_args(["--shapes", "4096x6144, 14336X4096", "--batches", "1,64"])
    assert args.shapes == [(4096, 6144), (14336, 4096)] and args.batches == [1, 64]
    assert wmm.build_parser().parse_args([]).shapes == [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]


def test_tiny_run_on_the_cpu_writes_rows(wmm, tmp_path):
    out = tmp_path / "wmm.json"
    argv = ["--shapes", "128x256", "--batches", "1", "--copies", "2", "--repeats", "1", "--output-json", str(out)]
    assert wmm.main(argv) == 0
    result = json.loads(out.read_text())
    assert {"device", "jax", "date"} <= result.keys() and result["jax"] == jax.__version__
    by_variant = {}
    for row in result["rows"]:
        by_variant.setdefault(row["variant"], []).append(row)
    assert len(by_variant["copy"]) == 2
    for variant in ("xla_bf16", "xla_int8"):
        (row,) = by_variant[variant]
        assert row["ms"] > 0 and row["gbps"] > 0 and row["frac_copy"] > 0 and row["err"] < 1e-2
    assert by_variant["xla_int8"][0]["bytes"] == 128 * 256 + 256 * 4
    assert all("needs a GPU" in row["error"] for row in by_variant["pallas_int8"])  # on the CPU
