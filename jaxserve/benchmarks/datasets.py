"""Benchmark prompts made as vLLM's benchmarks make them, so that one command line measures the
same work against jaxserve or any other server:

    random    lengths drawn uniformly from [L(1-r), L(1+r)] (r: --random-range-ratio) for the input
              (less the tokenizer's special tokens) and the output; ids drawn from the vocabulary
              without its special tokens, after an optional shared random prefix; decoded to text
              and re-encoded, so that the text sent is what the count says (or a token-id list
              when there is no tokenizer: a random-weight preset)
    sharegpt  a local ShareGPT JSON (--dataset-path): each conversation's first turn is the prompt
              and the second's token count the output length (unless fixed); pairs shorter than
              4 tokens or longer than 1024 (prompt) / 2048 (both) are skipped; shuffled by seed

The client's tokenizer (load_client_tokenizer): --tokenizer, else the model's folder, else the
embedded default model's (SmolLM2-135M-Instruct) converted folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    prompt: str | list[int]  # text, or token ids where there is no tokenizer
    prompt_len: int  # tokens, as the client's tokenizer counts them
    expected_output_len: int


def load_client_tokenizer(tokenizer: str | None, model: str | None, cache_dir: str | Path | None = None):
    """The tokenizer a benchmark counts and makes prompts with: `tokenizer` (a folder or a Hugging
    Face name in the local cache), else `model` when it is a folder or a .gguf file, else the
    embedded default model's folder when `model` is None or names it."""
    from jaxserve.default_model import DEFAULT_MODEL_NAME, default_model_folder, gguf_model_folder, is_gguf

    source = tokenizer
    if source is None:
        if model is None or model == DEFAULT_MODEL_NAME:
            source = default_model_folder(cache_dir)
        elif is_gguf(model):
            source = gguf_model_folder(model, cache_dir)
        else:
            source = model
    if Path(source).is_dir():
        from jaxserve.tokenizer import load_tokenizer

        return load_tokenizer(source)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception as e:  # not a folder, and not a name transformers can resolve here
        raise SystemExit(
            f"no tokenizer for {source!r} ({type(e).__name__}): pass --tokenizer FOLDER, the served model's "
            "tokenizer (its Hugging Face folder)"
        ) from None


def length_range(length: int, range_ratio: float, minimum: int = 0) -> tuple[int, int]:
    """[floor(L(1-r)), ceil(L(1+r))], each at least `minimum`."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    return max(minimum, math.floor(length * (1 - range_ratio))), max(minimum, math.ceil(length * (1 + range_ratio)))


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    *,
    tokenizer=None,
    vocab_size: int | None = None,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
    seed: int = 0,
) -> list[SampleRequest]:
    """vLLM's random dataset (see the module docstring); without a tokenizer, token-id prompts
    over `vocab_size` (clear of the first and last 100 ids, where special tokens usually are)."""
    rng = np.random.default_rng(seed)
    if tokenizer is None:
        if vocab_size is None:
            raise ValueError("random prompts need a tokenizer or a vocab_size")
        allowed, special = np.arange(100, vocab_size - 100), 0
    else:
        special = int(tokenizer.num_special_tokens_to_add())
        allowed = np.setdiff1d(np.arange(tokenizer.vocab_size), np.asarray(tokenizer.all_special_ids, dtype=np.int64))
    in_lo, in_hi = length_range(max(0, input_len - special), range_ratio)
    out_lo, out_hi = length_range(output_len, range_ratio, minimum=1)
    if prefix_len + in_lo < 1:
        raise ValueError(f"--random-input-len {input_len} leaves no prompt token (special tokens: {special})")
    input_lens = rng.integers(in_lo, in_hi + 1, size=num_prompts)
    output_lens = rng.integers(out_lo, out_hi + 1, size=num_prompts)
    prefix = allowed[rng.integers(0, len(allowed), size=prefix_len)].tolist()
    requests = []
    for n, out in zip(input_lens.tolist(), output_lens.tolist()):
        ids = prefix + allowed[rng.integers(0, len(allowed), size=n)].tolist()
        if tokenizer is None:
            requests.append(SampleRequest(ids, len(ids), out))
            continue
        text, count = _text_of_length(tokenizer, ids, len(ids), allowed, rng)
        requests.append(SampleRequest(text, count, out))
    return requests


def _text_of_length(tokenizer, ids: list[int], target: int, allowed: np.ndarray, rng) -> tuple[str, int]:
    """Text whose re-encoding has `target` tokens where a few tries reach it: decoding random ids and
    encoding the text again merges or splits some, so cut or pad the ids and try again."""
    for _ in range(10):
        text = tokenizer.decode(ids)
        again = tokenizer.encode(text, add_special_tokens=False)
        if len(again) == target:
            return text, target
        ids = again[:target] if len(again) > target else again + allowed[rng.integers(0, len(allowed), 1)].tolist()
    return text, len(again)


def sharegpt_requests(
    path: str | Path, tokenizer, num_prompts: int, *, output_len: int | None = None, seed: int = 0
) -> list[SampleRequest]:
    """Prompts and output lengths from a local ShareGPT JSON (see the module docstring)."""
    entries = json.loads(Path(path).read_text())
    conversations = [e.get("conversations") or e.get("conversation") or [] for e in entries]
    conversations = [c for c in conversations if len(c) >= 2]
    order = np.random.default_rng(seed).permutation(len(conversations))
    requests = []
    for i in order.tolist():
        prompt, completion = conversations[i][0]["value"], conversations[i][1]["value"]
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
        out = output_len or len(tokenizer.encode(completion, add_special_tokens=False))
        if prompt_len < 4 or (output_len is None and out < 4) or prompt_len > 1024 or prompt_len + out > 2048:
            continue
        requests.append(SampleRequest(prompt, prompt_len, out))
        if len(requests) == num_prompts:
            break
    if len(requests) < num_prompts:
        raise SystemExit(f"{path}: only {len(requests)} usable conversations for --num-prompts {num_prompts}")
    return requests
