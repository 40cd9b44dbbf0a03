"""Input processing: a prompt and its SamplingParams -> a PreparedRequest the engine core accepts.

    prompt (text | token ids | {"prompt_token_ids": [...]} | {"prompt": text})
        -> token ids (the tokenizer adds the special tokens it is made to add)
        -> validated against the model (vocabulary, context length) and the engine (logits
           processors registered, a tokenizer for stop strings, a grammar that compiles):
           ValueError names what is wrong

No engine state is read or written: it is safe on any thread (the server calls it in workers).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxserve.sampling_params import SamplingParams

Prompt = str | list[int] | dict


class PreparedRequest(NamedTuple):
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams


class InputProcessor:
    def __init__(self, tokenizer, *, vocab_size: int, max_model_len: int, processor_names: list[str], grammars=None):
        self.tokenizer, self.grammars = tokenizer, grammars  # grammars: structured_outputs.GrammarCompiler
        self.vocab_size, self.max_model_len, self.processor_names = vocab_size, max_model_len, processor_names

    def prepare(self, prompt: Prompt, params: SamplingParams | None = None) -> PreparedRequest:
        params = params or SamplingParams()
        text, ids = self._tokenize(prompt)
        self._validate(ids, params)
        return PreparedRequest(text, ids, params)

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: give prompts as token ids")
            return prompt, self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            return None, [int(t) for t in prompt]
        raise ValueError(
            f"a prompt is a string, a list of token ids or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}"
        )

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        vocab = self.vocab_size
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of the vocabulary [0, {vocab}): {bad[:5]}")
        wanted = len(ids) + (params.max_tokens if params.max_tokens is not None else 1)
        if wanted > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{wanted} tokens ({len(ids)} in the prompt, {wanted - len(ids)} for the completion)."
            )
        for name, toks in (("logit_bias", params.logit_bias.keys()), ("stop_token_ids", params.stop_token_ids)):
            outside = [t for t in toks if not 0 <= t < vocab]
            if outside:
                raise ValueError(f"{name} token ids out of the vocabulary [0, {vocab}): {outside[:5]}")
        unknown = set(params.logits_processors) - set(self.processor_names)
        if unknown:
            raise ValueError(f"unknown logits processors {sorted(unknown)}; registered: {self.processor_names}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if params.structured_outputs is not None:
            if self.grammars is None:
                raise ValueError("structured outputs need a tokenizer: this engine has none")
            self.grammars.compile(params.structured_outputs)  # compiled and cached, or ValueError
