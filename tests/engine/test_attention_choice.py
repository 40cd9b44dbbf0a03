"""attention_impl "auto" picks the Pallas kernel only where it runs the model's dtype, head_dim and
page size on the device (faked here: H100/H200 sm_90, A100 sm_80, the CPU); an explicit "pallas" that
cannot run raises before any weights load; the kernel's stated requirements agree with what Mosaic GPU
actually lowers (for the cuda platform, on the CPU)."""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import pytest

from jaxserve.config import EngineConfig
from jaxserve.engine import startup
from jaxserve.engine.attention_choice import DeviceInfo, choose_attention_impl
from pallas_kernels import ragged_paged_attention
from pallas_kernels.ragged_paged_attention_support import unmet_requirements

H100 = DeviceInfo("gpu", "NVIDIA H100 80GB HBM3", "9.0")
H200 = DeviceInfo("gpu", "NVIDIA H200", "9.0")
A100 = DeviceInfo("gpu", "NVIDIA A100-SXM4-80GB", "8.0")
B200 = DeviceInfo("gpu", "NVIDIA B200", "10.0")
CPU = DeviceInfo("cpu", "cpu")
DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)


@pytest.mark.parametrize("device", [H100, H200], ids=["h100", "h200"])
@pytest.mark.parametrize(
    "dtype,head_dim,page_size,impl",
    [
        (jnp.bfloat16, 128, 16, "pallas"),
        (jnp.float16, 128, 16, "pallas"),
        (jnp.bfloat16, 64, 16, "pallas"),
        (jnp.float16, 64, 8, "pallas"),
        (jnp.bfloat16, 128, 128, "pallas"),
        (jnp.bfloat16, 64, 256, "pallas"),
        (jnp.float32, 128, 16, "xla"),  # wgmma takes 16-bit operands
        (jnp.float32, 64, 16, "xla"),
        (jnp.bfloat16, 96, 16, "xla"),  # not a multiple of 64
        (jnp.float16, 96, 16, "xla"),
        (jnp.bfloat16, 128, 24, "xla"),  # the K/V block is no whole number of pages
        (jnp.bfloat16, 128, 256, "xla"),  # the K/V ring overflows shared memory
        (jnp.bfloat16, 256, 16, "xla"),
        (jnp.bfloat16, 64, 12, "xla"),
    ],
)
def test_auto_on_hopper(device, dtype, head_dim, page_size, impl):
    choice = choose_attention_impl("auto", dtype, head_dim, page_size, device)
    assert choice.impl == impl
    assert "\n" not in choice.reason and choice.reason.startswith("auto: ")
    if impl == "pallas":
        assert device.device_kind in choice.reason and "sm_90" in choice.reason


def test_auto_reasons_name_what_is_missing():
    assert "got float32" in choose_attention_impl("auto", jnp.float32, 128, 16, H200).reason
    assert "head_dim a multiple of 64" in choose_attention_impl("auto", jnp.bfloat16, 96, 16, H200).reason
    assert "page size" in choose_attention_impl("auto", jnp.bfloat16, 64, 24, H200).reason
    assert "shared memory" in choose_attention_impl("auto", jnp.bfloat16, 128, 256, H200).reason


@pytest.mark.parametrize("kv_dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_fp8_kv_pages_on_hopper(kv_dtype):
    """fp8 pages halve the ring and add a widened 16-bit tile per compute warpgroup: head_dim 64
    and 128 with pages 16-128 fit; pages of another 16-bit dtype do not run."""
    for head_dim in (64, 128):
        for page_size in (16, 32, 64, 128):
            choice = choose_attention_impl("auto", jnp.bfloat16, head_dim, page_size, H100, kv_dtype=kv_dtype)
            assert choice.impl == "pallas", choice.reason
            assert jnp.dtype(kv_dtype).name in choice.reason
    assert "shared memory" in choose_attention_impl("auto", jnp.bfloat16, 256, 16, H100, kv_dtype=kv_dtype).reason
    other = choose_attention_impl("auto", jnp.bfloat16, 128, 16, H100, kv_dtype=jnp.float16)
    assert other.impl == "xla" and "fp8" in other.reason


@pytest.mark.parametrize("device", [A100, B200], ids=["a100", "b200"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 96])
def test_auto_off_hopper_is_xla(device, dtype, head_dim):
    choice = choose_attention_impl("auto", dtype, head_dim, 16, device)
    assert choice.impl == "xla"
    assert "Hopper" in choice.reason and f"sm_{device.compute_capability.replace('.', '')}" in choice.reason


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,page_size", [(64, 16), (128, 32), (96, 16), (128, 256)])
def test_auto_on_cpu_is_xla(dtype, head_dim, page_size):
    choice = choose_attention_impl("auto", dtype, head_dim, page_size, CPU)
    assert choice.impl == "xla" and "not a GPU (cpu)" in choice.reason


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("device", [H100, A100, CPU])
@pytest.mark.parametrize("dtype", DTYPES)
def test_xla_and_reference_run_everywhere(impl, device, dtype):
    for head_dim, page_size in ((64, 16), (96, 24), (128, 256)):
        assert choose_attention_impl(impl, dtype, head_dim, page_size, device).impl == impl


def test_explicit_pallas_that_runs():
    assert choose_attention_impl("pallas", jnp.bfloat16, 128, 16, H100).impl == "pallas"
    # off a GPU: interpret mode, which takes float32 and any head_dim up to 256 (no shared memory)
    for dtype in DTYPES:
        choice = choose_attention_impl("pallas", dtype, 64, 16, CPU)
        assert choice.impl == "pallas" and "interpret mode" in choice.reason
    assert choose_attention_impl("pallas", jnp.float32, 192, 256, CPU).impl == "pallas"


@pytest.mark.parametrize(
    "dtype,head_dim,page_size,device,needs",
    [
        (jnp.float32, 128, 16, H200, ["needs dtype bfloat16 or float16; got float32", "interpret mode only"]),
        (jnp.bfloat16, 128, 16, A100, ["needs a Hopper GPU (compute capability 9.x, sm_90", "got sm_80"]),
        (jnp.bfloat16, 128, 16, B200, ["Hopper", "got sm_100"]),
        (jnp.bfloat16, 96, 16, H100, ["needs head_dim a multiple of 64 up to 256; got 96"]),
        (jnp.bfloat16, 128, 24, H100, ["(8, 16, 32, 64, 128, 192, 256); got 24"]),
        (jnp.bfloat16, 128, 256, H100, ["227 KiB of shared memory", "takes 402 KiB"]),
        (jnp.float32, 96, 16, CPU, ["head_dim a multiple of 64"]),
        # several at once: each named
        (jnp.float32, 96, 12, A100, ["sm_80", "got float32", "got 96", "multiple of 8 up to 256; got 12"]),
    ],
)
def test_explicit_pallas_that_cannot_run_names_what_it_needs(dtype, head_dim, page_size, device, needs):
    with pytest.raises(ValueError) as err:
        choose_attention_impl("pallas", dtype, head_dim, page_size, device)
    message = str(err.value)
    assert message.startswith("attention_impl='pallas' cannot run ")
    assert f"head_dim {head_dim}, page size {page_size} on {device.describe()}" in message
    assert "Use attention_impl='auto' or 'xla'" in message
    for need in needs:
        assert need in message


def test_unknown_impl():
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
        choose_attention_impl("flash", jnp.bfloat16, 128, 16, H100)


def test_device_info():
    cpu = DeviceInfo.of()
    assert cpu.platform == jax.local_devices()[0].platform and cpu.compute_capability is None
    fake = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200", compute_capability="9.0")
    assert DeviceInfo.of(fake) == H200
    assert H200.describe() == "NVIDIA H200 (sm_90)" and CPU.describe() == "cpu"


# --- engine start-up: the choice comes before any weights, and is logged ------------------------


def _start(monkeypatch, device, **config):
    loaded, lines = [], []
    monkeypatch.setattr(startup, "DeviceInfo", types.SimpleNamespace(of=lambda: device))
    monkeypatch.setattr(startup, "load_model", lambda folder, **kw: loaded.append(kw) or "model")
    cfg = EngineConfig(model="smollm2-135m", load_format="dummy", **config)  # a preset: head_dim 64
    model, _ = startup.build_model_and_tokenizer(cfg, progress=False, log=lines.append)
    return model, loaded, lines


def test_engine_logs_its_choice(monkeypatch):
    _, loaded, lines = _start(monkeypatch, H200, dtype="float32")
    assert loaded[0]["attention_impl"] == "xla"
    assert lines[0].startswith("attention: xla (auto: the Pallas kernel needs dtype bfloat16 or float16; got float32")
    _, loaded, lines = _start(monkeypatch, H200, dtype="bfloat16")
    assert loaded[0]["attention_impl"] == "pallas" and lines[0].startswith("attention: pallas (auto: ")
    _, loaded, _ = _start(monkeypatch, H200)  # dtype "auto": the preset's bfloat16
    assert loaded[0]["attention_impl"] == "pallas"


def test_explicit_pallas_fails_before_loading(monkeypatch):
    loaded = []
    monkeypatch.setattr(startup, "load_model", lambda *a, **kw: loaded.append(kw))
    for device, dtype, needs in ((A100, "bfloat16", "sm_80"), (H100, "float32", "got float32")):
        monkeypatch.setattr(startup, "DeviceInfo", types.SimpleNamespace(of=lambda device=device: device))
        cfg = EngineConfig(model="smollm2-135m", load_format="dummy", dtype=dtype, attention_impl="pallas")
        with pytest.raises(ValueError, match=f"attention_impl='pallas' cannot run .*{needs}"):
            startup.build_model_and_tokenizer(cfg, progress=False, log=lambda line: None)
    assert not loaded


# --- the stated requirements against the Mosaic GPU lowering itself -----------------------------


def _lowers_for_hopper(dtype, head_dim, page_size, kv_dtype) -> bool:
    """Traces and lowers ragged_paged_attention for the cuda platform (no GPU needed), for a
    decode-shaped and a prefill-shaped batch (their configs differ)."""
    sd = jax.ShapeDtypeStruct
    fn = jax.jit(functools.partial(ragged_paged_attention, sm_scale=0.1))
    for rows in (64, 4):  # 64 tokens: decode-shaped at 64 rows, prefill-shaped at 4
        args = (
            sd((64, 8, head_dim), dtype),
            sd((32, page_size, 2, head_dim), kv_dtype),
            sd((32, page_size, 2, head_dim), kv_dtype),
            sd((rows,), jnp.int32),
            sd((rows, 8), jnp.int32),
            sd((rows + 1,), jnp.int32),
            sd((1,), jnp.int32),
        )
        try:
            fn.trace(*args).lower(lowering_platforms=("cuda",))
        except (ValueError, AssertionError):
            return False
    return True


E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2


@pytest.mark.parametrize(
    "dtype,head_dim,page_size,kv_dtype",
    [
        (jnp.bfloat16, 128, 128, None),  # the K/V ring just fits shared memory
        (jnp.float16, 128, 8, None),
        (jnp.bfloat16, 64, 256, None),
        (jnp.float16, 64, 192, None),
        (jnp.bfloat16, 128, 192, None),  # shared memory
        (jnp.bfloat16, 192, 16, None),
        (jnp.bfloat16, 64, 24, None),  # block_kv 128 is no whole number of pages
        (jnp.bfloat16, 64, 136, None),  # the PV wgmma's K must be a multiple of 64
        (jnp.float32, 64, 16, None),  # compiled: 16-bit only
        (jnp.bfloat16, 96, 16, None),
        # fp8 pages: the decode config's 16-bit V tiles and 8-bit q beside the 8-bit ring
        (jnp.bfloat16, 128, 64, E4M3),  # 202 KiB (the decode config: blocks of 64 x 8)
        (jnp.bfloat16, 128, 128, E4M3),  # 193 KiB (PREFILL_CONFIG; the decode config 170)
        (jnp.bfloat16, 128, 256, E4M3),  # shared memory
        (jnp.float16, 64, 256, E5M2),
        (jnp.bfloat16, 64, 16, E5M2),
    ],
)
def test_requirements_match_the_lowering(dtype, head_dim, page_size, kv_dtype):
    runs = not unmet_requirements(dtype, head_dim, page_size, compute_capability="9.0", kv_dtype=kv_dtype)
    assert runs == _lowers_for_hopper(dtype, head_dim, page_size, kv_dtype or dtype)
