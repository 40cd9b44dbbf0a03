"""The memory plan: how much device memory a step needs, how many KV pages fit, how long a context.

step workspace (measured once per model, plan and code version; then read back from the
cache folder) -> KV budget: gpu_memory_utilization x device memory - weights - workspace
-> pages = budget / page bytes (of the KV dtype: fp8 pages are half of bf16's); max_model_len
capped by what one sequence can hold
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import EngineConfig
from jaxserve.default_model import default_cache_dir
from jaxserve.engine.executable_cache import environment_key, write_atomically


def step_workspace(config: EngineConfig, model, shapes, processor_names, measure: Callable[[], int]) -> int:
    """The step's device workspace in bytes: measured by compiling the largest shape (`measure`),
    once per model, plan, device and version of this code; later start-ups read it back from the
    cache folder instead of compiling the probe again."""
    key = environment_key(
        type(model).__name__,
        nnx.graphdef(model),
        model.config,
        str(model.dtype),
        shapes,
        config.max_num_seqs,
        config.page_size,
        config.kv_cache_dtype,
        config.tensor_parallel_size,
        list(processor_names),
    )
    record = Path(config.cache_dir or default_cache_dir()) / "workspace" / f"{key}.json"
    try:
        return int(json.loads(record.read_text())["bytes"])
    except (OSError, ValueError, KeyError, TypeError):  # absent or damaged: measure again
        pass
    workspace = measure()
    write_atomically(record, json.dumps({"bytes": workspace}).encode())
    return workspace


def kv_dtype(config: EngineConfig, model) -> jnp.dtype:
    """The KV pages' dtype: the model's, or the fp8 format asked for."""
    return jnp.dtype(config.kv_dtype_name or model.dtype)


def page_bytes(model, page_size: int, dtype=None) -> int:
    """Bytes of one page across all layers and all devices (kv heads as served), of `dtype` (None:
    the model's)."""
    cfg = model.config
    itemsize = jnp.dtype(dtype or model.dtype).itemsize
    return 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.head_dim * itemsize


def plan_kv_cache(config: EngineConfig, model, *, workspace_bytes: int = 0, log: Callable = print) -> tuple[int, int]:
    """(max_model_len, num_pages). The budget is gpu_memory_utilization of the device's memory less
    what is already in use (weights) and the step's workspace; on a device that reports no memory
    (the CPU), cpu_kv_cache_bytes."""
    cfg = model.config
    dtype = kv_dtype(config, model)
    per_page = page_bytes(model, config.page_size, dtype)
    stats = jax.local_devices()[0].memory_stats() or {}
    if config.num_kv_pages is not None:
        num_pages = config.num_kv_pages
    elif "bytes_limit" in stats:
        budget = config.gpu_memory_utilization * stats["bytes_limit"] - stats.get("bytes_in_use", 0) - workspace_bytes
        num_pages = int(budget // per_page)
    else:
        num_pages = config.cpu_kv_cache_bytes // per_page
    if num_pages < 1:
        raise ValueError(f"no memory left for the KV cache (one page needs {per_page} bytes)")
    capacity = num_pages * config.page_size
    limit = cfg.max_position_embeddings
    if cfg.sliding_window is not None and cfg.sliding_window < limit:
        log(
            f"note: sliding-window attention is not implemented; max_model_len capped at the window ({cfg.sliding_window})"
        )
        limit = cfg.sliding_window
    if config.max_model_len is not None:
        if config.max_model_len > limit:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's limit of {limit} tokens")
        if config.max_model_len > capacity:
            raise ValueError(f"max_model_len={config.max_model_len} does not fit the KV cache ({capacity} tokens)")
        max_model_len = config.max_model_len
    else:
        max_model_len = min(limit, capacity)
    log(
        f"KV cache ({config.kv_cache_dtype}: {dtype.name}): {num_pages} pages x {config.page_size} tokens = "
        f"{capacity} tokens fit ({num_pages * per_page / 2**30:.2f} GiB); max_model_len {max_model_len}"
    )
    return max_model_len, num_pages
