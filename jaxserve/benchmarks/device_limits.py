"""The ceilings a benchmark reports its figures against, measured in the same run:

    copy_bandwidth(): bytes read + written per second by a device-to-device copy
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
    fn(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def torch_copy_bandwidth(nbytes: int = 2 << 30) -> float | None:
    """PyTorch's device-to-device copy_ rate (the figure KINDS.md quotes); None without a CUDA torch."""
    torch = _torch_cuda()
    if torch is None:
        return None
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    seconds = _time_torch(torch, lambda: dst.copy_(src))  # noqa: F821 (called before the del below)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / seconds


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    bandwidth = torch_copy_bandwidth(nbytes)
    if bandwidth is not None:
        return bandwidth
    import jax
    import jax.numpy as jnp

    return 2 * nbytes / _time_jax(jax.jit(lambda a: a + 1), jnp.ones(nbytes // 2, jnp.bfloat16))


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


def copy_seconds(nbytes: int, copies: int = 1) -> float:
    """Seconds of one device-to-device copy of `nbytes` (it reads nbytes and writes as many), the
    copies taking turns over `copies` source buffers so that, with enough of them, a small source
    is not still in the L2 cache from its last turn. PyTorch's copy_ where it sees a GPU, else JAX
    (a + 0 on uint8 buffers, chained in one jit). Median of 10 timed rounds after a warm-up."""
    torch = _torch_cuda()
    if torch is not None:
        srcs = [torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(copies)]
        dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

        def round_():
            for src in srcs:
                dst.copy_(src)

        seconds = _time_torch(torch, round_) / copies
        del srcs, dst
        torch.cuda.empty_cache()
        return seconds
    import jax
    import jax.numpy as jnp

    srcs = [jnp.full((nbytes,), i, jnp.uint8) for i in range(copies)]
    run = jax.jit(lambda srcs: [s + jnp.uint8(0) for s in srcs])  # each output a buffer of its own
    jax.block_until_ready(run(srcs))
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(run(srcs))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / copies
