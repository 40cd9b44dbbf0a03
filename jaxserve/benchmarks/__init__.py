"""What the benchmark and profiling scripts (scripts/bench_*.py, profile_*.py) share, in the
package so that they import it like any module instead of each other:

    datasets.py       prompts as vLLM's benchmarks make them (random, ShareGPT) and the client's tokenizer
    device_limits.py  the device's ceilings a figure is reported against (copy bandwidth, matmul rate)
    traces.py         a JAX profiler trace, summarised per plane and line
    attention_batch.py  a random ragged batch for the attention kernels (kernel benchmarks, profiles)
    kernel_timing.py  a kernel call timed on the device (calls chained in one jit), its error
    collectives.py    the collectives of a compiled program, from its HLO text (tensor parallelism)

Nothing in the engine or the server imports this package.
"""
