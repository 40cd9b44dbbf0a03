"""EngineConfig: everything that decides how the engine is built, fixed at start-up; and
DistributedConfig: how a serving process joins the others (several hosts, jax.distributed)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

# kv_cache_dtype names (vLLM's) -> the pages' dtype; "auto": the model's own.
KV_CACHE_DTYPES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF folder or preset name; None: the embedded SmolLM2-135M-Instruct
    tokenizer: str | None = None  # defaults to the model folder
    load_format: str = "auto"  # "auto" | "safetensors" | "dummy"
    dtype: str = "auto"  # "auto" | "bfloat16" | "float32"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None  # None: the model's max_position_embeddings, capped by the cache
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    gpu_memory_utilization: float = 0.9
    seed: int = 0
    page_size: int = 16
    attention_impl: str = "auto"  # "auto" | "xla" | "pallas" | "reference" (models.attention)
    num_kv_pages: int | None = None  # override the memory-derived page count
    cpu_kv_cache_bytes: int = 1 << 30  # KV budget where the device reports no memory (CPU)
    min_token_bucket: int = 16
    row_bucket_growth: int = 4  # factor between request-count buckets; 0: one per token bucket
    token_bucket_growth: int = 2  # factor between token-count buckets (powers of two by default)
    cache_dir: str | Path | None = None  # converted default model, XLA compilation cache, compiled steps
    # Keep compiled steps in cache_dir, so a warm start skips lowering them. None: on a GPU only
    # (XLA on the CPU cannot always reload an executable it serialized). One device only, so far.
    executable_cache: bool | None = None
    max_waiting_requests: int | None = None
    async_scheduling: bool = True  # schedule step n+1 while step n runs; False: one step at a time
    # Reuse the KV pages of prompt prefixes already computed (jaxserve/scheduler/kv_pages.py).
    enable_prefix_caching: bool = True
    # KV pages: "auto" (the model's dtype) or fp8 ("fp8" = "fp8_e4m3", "fp8_e5m2"), half of bf16's
    # bytes; fp8 pages hold K and V divided by a scale per layer (1.0, as vLLM's default).
    kv_cache_dtype: str = "auto"
    # fp8 pages: estimate each layer's scales from the first step that writes K/V (vLLM's
    # --calculate-kv-scales: amax / 200 for K, amax / 100 for V), then keep them.
    calculate_kv_scales: bool = False

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.token_bucket_growth < 2:
            raise ValueError(f"token_bucket_growth must be >= 2, got {self.token_bucket_growth}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be 'auto' or one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}"
            )
        if self.calculate_kv_scales and self.kv_cache_dtype == "auto":
            raise ValueError(
                "calculate_kv_scales needs fp8 KV pages (kv_cache_dtype 'fp8', 'fp8_e4m3' or 'fp8_e5m2'): "
                "pages of the model's dtype hold K and V unscaled"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")

    @property
    def kv_dtype_name(self) -> str | None:
        """The fp8 format of the KV pages, as a numpy dtype name; None: the model's dtype."""
        return KV_CACHE_DTYPES.get(self.kv_cache_dtype)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """JAX's multi-controller runtime (jax.distributed) for serving from several processes (hosts):
    every process runs the same engine over one mesh; process 0 serves HTTP and broadcasts the
    requests (jaxserve/engine/multihost.py). num_processes=1: off."""

    coordinator_address: str | None = None  # "HOST:PORT" of process 0's coordination service
    num_processes: int = 1
    process_id: int = 0

    def __post_init__(self):
        if self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if self.num_processes == 1:
            if self.coordinator_address is not None or self.process_id != 0:
                raise ValueError("--coordinator-address and --process-id need --num-processes > 1")
            return
        if not self.coordinator_address:
            raise ValueError("--num-processes > 1 needs --coordinator-address HOST:PORT (process 0's host)")
        host, _, port = self.coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--coordinator-address must be HOST:PORT, got {self.coordinator_address!r}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"--process-id must be in [0, {self.num_processes}), got {self.process_id}")

    @property
    def enabled(self) -> bool:
        return self.num_processes > 1

    @property
    def is_leader(self) -> bool:
        """Process 0: the one that serves HTTP, decides every step's inputs and streams the results."""
        return self.process_id == 0
