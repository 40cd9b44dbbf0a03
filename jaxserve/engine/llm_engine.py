"""LLMEngine: the engine for synchronous callers (LLM, tests, benchmarks), all on one thread.

    add_request: input_processor.prepare (tokenize, validate) -> core.add_request
                 -> output_processor.add (the family's samples)
    step:        core.step (schedule -> launch -> wait -> update) -> output_processor.process
                 (detokenize, stop strings, RequestOutputs) -> stop strings back to the core

AsyncLLM (async_engine.py) runs the same core on a thread of its own and the output processing
on the caller's event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax

from jaxserve.config import EngineConfig
from jaxserve.engine import compile_counter
from jaxserve.engine.core import EngineCore, StepStats
from jaxserve.engine.input_processor import InputProcessor, PreparedRequest, Prompt
from jaxserve.engine.output_processor import OutputProcessor
from jaxserve.engine.recovery import StepFailed
from jaxserve.engine.startup import build_engine
from jaxserve.engine.structured_outputs import GrammarCompiler
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams

__all__ = ["LLMEngine", "PreparedRequest", "Prompt", "StepFailed"]


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig = EngineConfig(),
        *,
        model=None,
        tokenizer=None,
        logits_processors: dict[str, Callable] | None = None,
        progress: bool = True,
        log: Callable = print,
    ):
        self.config = config
        processors = list((logits_processors or {}).items())
        parts = build_engine(
            config, model=model, tokenizer=tokenizer, processors=processors, progress=progress, log=log
        )
        self.tokenizer, self.model_config, self.plan = parts.tokenizer, parts.model_config, parts.plan
        self.max_model_len = parts.max_model_len
        self.compilations_after_warmup = parts.compilations_after_warmup
        # Structured outputs: grammars are compiled when a request is prepared (a bad one is a
        # ValueError before anything is queued) and cached for the core's matchers.
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size) if self.tokenizer else None
        self.core = EngineCore(
            parts.scheduler,
            parts.runner,
            eos_token_ids=parts.eos_token_ids,
            max_model_len=parts.max_model_len,
            async_scheduling=config.async_scheduling,
            seed=config.seed,
            grammars=self.grammars,
            log=log,
        )
        self.inputs = InputProcessor(
            self.tokenizer,
            vocab_size=self.model_config.vocab_size,
            max_model_len=self.max_model_len,
            processor_names=[name for name, _ in processors],
            grammars=self.grammars,
        )
        self.outputs = OutputProcessor(self.tokenizer)
        self._pending: list[RequestOutput] = []  # aborts' final outputs, returned by the next step
        self._next_id = 0

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: Prompt, params: SamplingParams | None = None) -> str:
        """Validates, tokenizes and queues a request; returns its id. Raises ValueError on bad input."""
        return self.add_prepared(request_id, self.prepare(prompt, params))

    def prepare(self, prompt: Prompt, params: SamplingParams | None = None) -> PreparedRequest:
        """Tokenizes and validates without touching engine state: safe to call from any thread."""
        return self.inputs.prepare(prompt, params)

    def add_prepared(self, request_id: str | None, prepared: PreparedRequest) -> str:
        if request_id is None:
            request_id, self._next_id = str(self._next_id), self._next_id + 1
        if self.outputs.has(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        sample_ids = self.core.add_request(request_id, prepared.prompt_token_ids, prepared.params)
        self.outputs.add(request_id, prepared.prompt, prepared.prompt_token_ids, prepared.params, sample_ids)
        return request_id

    def abort_request(self, request_id: str) -> None:
        self.core.abort(request_id)
        final = self.outputs.abort(request_id)
        if final is not None:
            self._pending.append(final)

    # -- one step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step (EngineCore.step) and its outputs (each request's as its output_kind
        says). Outputs trail the device by one step. Raises StepFailed naming the requests that
        failed for good."""
        outputs, self._pending = self._pending, []
        try:
            core_outputs = self.core.step()
        except StepFailed as e:
            for request_id in e.failed:
                self.outputs.drop(request_id)
            self._pending = outputs
            raise
        t0 = time.perf_counter()
        outputs += self._process(core_outputs)
        if core_outputs and self.core.last_step is not None:
            self.core.last_step.output_seconds = time.perf_counter() - t0
            self.core.last_step.host_seconds += self.core.last_step.output_seconds
        return outputs

    def _process(self, core_outputs) -> list[RequestOutput]:
        outputs = []
        for core_output in core_outputs:
            emitted, stopped = self.outputs.process(core_output)
            outputs += emitted
            for sample_id, stop in stopped:
                self.core.finish_stopped(sample_id, stop)
        return outputs

    # -- state ----------------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        """Requests not yet finished for their caller (what the device or the runner still
        holds of finished ones is settled by the next step, or by block_until_idle)."""
        return self.outputs.has_unfinished or bool(self._pending) or self.core.scheduler.has_unfinished

    @property
    def last_step(self) -> StepStats | None:
        return self.core.last_step

    @property
    def stats(self):
        return self.core.stats

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def runner(self):
        return self.core.runner

    @property
    def num_compilations_since_warmup(self) -> int:
        return compile_counter.compilations() - self.compilations_after_warmup

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def kv_cache_usage(self) -> float:
        return self.core.scheduler.kv.usage

    @property
    def num_requests_running(self) -> int:
        return len(self.core.scheduler.running)

    @property
    def num_requests_waiting(self) -> int:
        return len(self.core.scheduler.waiting)

    @property
    def cache_config(self) -> dict[str, str]:
        """The KV cache as planned at start-up, in vLLM's cache_config_info terms."""
        kv = self.core.scheduler.kv
        return {
            "block_size": str(kv.page_size),
            "num_gpu_blocks": str(kv.num_pages),
            "enable_prefix_caching": str(kv.enable_caching),
            "gpu_memory_utilization": str(self.config.gpu_memory_utilization),
            "cache_dtype": self.config.kv_cache_dtype,  # as asked, vLLM's names: "auto", "fp8", ...
        }

    @property
    def num_preemptions(self) -> int:
        return self.core.scheduler.num_preemptions

    @property
    def prefix_cache_queries(self) -> int:
        """Tokens of the requests that looked up the prefix cache when admitted."""
        return self.core.scheduler.prefix_cache.queries

    @property
    def prefix_cache_hits(self) -> int:
        """Of those, the tokens found cached (not computed again)."""
        return self.core.scheduler.prefix_cache.hits

    def reset_prefix_cache(self) -> int:
        """Forgets every cached KV page no request holds (pages held stay cached); returns how
        many were forgotten. Call it on the engine's thread."""
        return self.core.scheduler.reset_prefix_cache()

    def block_until_idle(self) -> None:
        """Once no request is unfinished: waits for the device and frees what finished requests
        left in the runner."""
        self._pending += self._process(self.core.settle())
        jax.block_until_ready(self.core.runner.kv_cache)
