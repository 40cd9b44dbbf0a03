"""jaxserve: a JAX/XLA serving engine for large language models on NVIDIA GPUs.

    model folder | preset | (none: embedded SmolLM2) -> models.loading -> Flax model on device
    prompts -> tokenizer -> engine (stage ragged batch -> jitted step over the paged KV cache)
            -> tokens -> tokenizer -> text

The HTTP server, the continuous-batching scheduler and the `LLM` API build on this.
"""

from jaxserve.llm import LLM
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
