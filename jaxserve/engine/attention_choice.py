"""Which attention implementation the engine builds the model with, and why; decided before any
weights are loaded.

    EngineConfig.attention_impl, the model's dtype, head_dim, page size, the device (DeviceInfo)
      -> choose_attention_impl -> AttentionChoice(impl, reason)     logged at start-up
         "auto"       the Pallas Mosaic GPU kernel where it runs all of them (a Hopper GPU, 16-bit
                      dtype, head_dim and page size it takes: pallas_kernels.ragged_paged_attention_support),
                      else "xla" (any dtype, head_dim, page size and backend)
         "pallas"     as asked; a ValueError naming what the kernel needs where it cannot run. Off a
                      GPU it runs in Pallas interpret mode (slow; for tests), which takes float32 too
         "xla", "reference"   as asked: they run everywhere

The device is passed in (DeviceInfo.of(jax device) at start-up), so tests can fake an H100 or an A100.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention_support import unmet_requirements

ATTENTION_IMPLS = ("auto", "pallas", "xla", "reference")


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    platform: str  # "gpu", "cpu", "tpu"
    device_kind: str = ""  # "NVIDIA H100 80GB HBM3"
    compute_capability: str | None = None  # CUDA GPUs: "9.0"

    @classmethod
    def of(cls, device=None) -> DeviceInfo:
        """The first local device, or the one given."""
        device = device if device is not None else jax.local_devices()[0]
        cc = getattr(device, "compute_capability", None)
        return cls(device.platform, device.device_kind, None if cc is None else str(cc))

    def describe(self) -> str:
        sm = f" (sm_{self.compute_capability.replace('.', '')})" if self.compute_capability else ""
        return f"{self.device_kind or self.platform}{sm}"


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    impl: str  # "pallas" | "xla" | "reference"
    reason: str  # one line

    def describe(self) -> str:
        return f"attention: {self.impl} ({self.reason})"


def choose_attention_impl(
    requested: str, dtype, head_dim: int, page_size: int, device: DeviceInfo, kv_dtype=None
) -> AttentionChoice:
    """kv_dtype: the KV pages' (fp8), None: the model's dtype."""
    if requested not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {requested!r}; choose one of {list(ATTENTION_IMPLS)}")
    name = jnp.dtype(dtype).name
    kv = "" if kv_dtype is None else f" with {jnp.dtype(kv_dtype).name} KV pages"
    what = f"{name}{kv}, head_dim {head_dim}, page size {page_size} on {device.describe()}"
    if requested in ("xla", "reference"):
        return AttentionChoice(requested, f"asked for; runs {what}")
    on_gpu = device.platform == "gpu"
    unmet = unmet_requirements(
        dtype,
        head_dim,
        page_size,
        interpret=not on_gpu,
        compute_capability=device.compute_capability,
        kv_dtype=kv_dtype,
    )
    if requested == "pallas":
        if unmet:
            raise ValueError(
                f"attention_impl='pallas' cannot run {what}: the Pallas kernel {'; '.join(unmet)}. "
                "Use attention_impl='auto' or 'xla'."
            )
        mode = "the Mosaic GPU kernel, compiled" if on_gpu else "the kernel in Pallas interpret mode (slow; for tests)"
        return AttentionChoice("pallas", f"asked for; {mode}: {what}")
    if not on_gpu:
        return AttentionChoice(
            "xla", f"auto: not a GPU ({device.platform}); the Pallas kernel compiles for Hopper only"
        )
    if unmet:
        return AttentionChoice("xla", f"auto: the Pallas kernel {'; '.join(unmet)}")
    return AttentionChoice("pallas", f"auto: the Pallas Mosaic GPU kernel runs {what}")
