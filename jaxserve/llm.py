"""LLM: the offline Python API, shaped like vLLM's.

    llm = LLM()                                   # the embedded SmolLM2-135M-Instruct
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    outs = llm.chat([{"role": "user", "content": "Hi"}])

generate() validates and queues every prompt first (bad input raises before anything runs), then
steps the engine until all are done, with a progress bar.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import jax
from tqdm.auto import tqdm

from jaxserve.config import EngineConfig
from jaxserve.engine.llm_engine import LLMEngine, Prompt
from jaxserve.engine_args import default_plan, describe_plan, with_plan
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import RequestOutputKind, SamplingParams
from jaxserve.tokenizer import chat_prompt_ids


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        logits_processors: dict[str, Callable] | None = None,
        progress: bool = True,
        **engine_args,
    ):
        """engine_args: any EngineConfig field (load_format, dtype, tensor_parallel_size,
        max_model_len, max_num_seqs, max_num_batched_tokens, gpu_memory_utilization, seed, ...).
        On a CPU, without any of the plan's fields (engine_args.PLAN_FIELDS), the plan is
        engine_args.CPU_PLAN: a few small step shapes, so that start-up takes seconds, not minutes."""
        # An entry point: transformers' advice that PyTorch is absent (jaxserve never needs it) stays quiet.
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        plan = default_plan(jax.default_backend())
        engine_args, planned = with_plan(engine_args, plan)
        if planned:
            print(describe_plan(plan, "kwargs"))
        self.engine = LLMEngine(
            EngineConfig(model=model, **engine_args), logits_processors=logits_processors, progress=progress
        )

    def get_tokenizer(self):
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> int:
        """Forgets the cached KV of earlier prompts (enable_prefix_caching); returns the pages freed."""
        return self.engine.reset_prefix_cache()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        return self._run(prompts, params, use_tqdm)

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of them, through the chat template."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": chat_prompt_ids(tokenizer, conv)} for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, prompts, params, use_tqdm) -> list[RequestOutput]:
        engine = self.engine
        ids = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                # Only the final outputs are returned: intermediate ones are never built. A copy,
                # so that the caller's params are left as they were.
                final_only = dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
                ids.append(engine.add_request(None, prompt, final_only))
        except Exception:
            for rid in ids:
                engine.abort_request(rid)
            engine.step()  # drain the aborts' outputs
            raise
        final: dict[str, RequestOutput] = {}
        wanted = set(ids)
        with tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            try:
                while len(final) < len(ids):
                    for out in engine.step():
                        if out.finished and out.request_id in wanted and out.request_id not in final:
                            final[out.request_id] = out
                            bar.update(1)
            except Exception:  # a request failed for good: give back everything this call queued
                for rid in ids:
                    engine.abort_request(rid)
                engine.step()
                raise
        return [final[rid] for rid in ids]
