"""jaxserve: a JAX/XLA serving engine for large language models on NVIDIA GPUs.

    model folder | preset | (none: embedded SmolLM2) -> models.loading -> Flax model on device
    prompts -> tokenizer -> engine (stage ragged batch -> jitted step over the paged KV cache)
            -> tokens -> tokenizer -> text

The HTTP server, the continuous-batching scheduler and the `LLM` API build on this.
"""

import os

# JAX preallocates 75% of GPU memory by default; a server wants nearly all of it (the KV cache
# takes gpu_memory_utilization of what JAX manages). Set before JAX starts its GPU client.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

from jaxserve.outputs import CompletionOutput, RequestOutput  # noqa: E402
from jaxserve.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "RequestOutputKind", "SamplingParams", "StructuredOutputsParams"]


def __getattr__(name: str):
    # LLM imports JAX and the engine (seconds): only when asked for, so that `jaxserve --help`, the
    # config and the scheduler import in milliseconds.
    if name == "LLM":
        from jaxserve.llm import LLM

        return LLM
    raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
