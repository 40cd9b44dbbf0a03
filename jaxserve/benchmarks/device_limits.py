"""The ceilings a benchmark reports its figures against, measured in the same run:

    copy_bandwidth(): bytes read + written per second by a device-to-device copy
    copy_seconds():   one such copy of a given size (over several sources in turn: no L2 hits)
    matmul_rate():    bf16 FLOP/s of a large square matrix product

Both through PyTorch when it sees a GPU (the GPU machine has it): XLA's elementwise copy reads
only ~2 TB/s on an H200 whose memory does ~4.3, which would flatter every fraction of it.
Elsewhere through JAX. Medians of 10 timed runs after a warm-up.
"""

from __future__ import annotations

import time

import numpy as np


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def torch_sees_a_gpu() -> bool:
    """Whether PyTorch (when installed) sees a CUDA GPU: a way to ask without starting JAX's GPU
    client, which takes most of the device's memory."""
    return _torch_cuda() is not None


def _time_torch(torch, fn, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return float(np.median(times))


def _time_jax(fn, x, repeats: int = 10) -> float:
    import jax

    jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def copy_seconds(nbytes: int, copies: int = 1) -> float:
    """Seconds of one device-to-device copy of `nbytes` (it reads nbytes and writes as many), the
    copies taking turns over `copies` source buffers so that, with enough of them, a small source
    is not still in the L2 cache from its last turn. PyTorch's copy_ where it sees a GPU, else JAX
    (a + 1 on uint8 buffers, in one jit: a + 0 XLA could drop)."""
    torch = _torch_cuda()
    if torch is not None:
        srcs = [torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(copies)]
        dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

        def copy_all():
            for src in srcs:
                dst.copy_(src)

        seconds = _time_torch(torch, copy_all) / copies
        del srcs, dst
        torch.cuda.empty_cache()
        return seconds
    import jax
    import jax.numpy as jnp

    srcs = [jnp.full((nbytes,), i, jnp.uint8) for i in range(copies)]
    run = jax.jit(lambda srcs: [s + jnp.uint8(1) for s in srcs])  # each output a buffer of its own
    return _time_jax(run, srcs) / copies


def torch_copy_bandwidth(nbytes: int = 2 << 30) -> float | None:
    """PyTorch's device-to-device copy_ rate (the figure KINDS.md quotes); None without a CUDA torch."""
    return None if _torch_cuda() is None else copy_bandwidth(nbytes)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    return 2 * nbytes / copy_seconds(nbytes)


def matmul_rate(n: int = 8192) -> float:
    torch = _torch_cuda()
    if torch is not None:
        a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
        seconds = _time_torch(torch, lambda: a @ b)
        del a, b
        torch.cuda.empty_cache()
        return 2 * n**3 / seconds
    import jax
    import jax.numpy as jnp

    n = min(n, 2048)  # a CPU
    a = jnp.ones((n, n), jnp.bfloat16)
    return 2 * n**3 / _time_jax(jax.jit(lambda x: x @ x), a)
