"""Tokenizer and chat template, through transformers' AutoTokenizer."""

from __future__ import annotations

from pathlib import Path


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded; the message names the folder and the cause."""


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError(f"{folder}: not a folder")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many kinds; the caller needs one clear error
        raise TokenizerError(f"{folder}: could not load the tokenizer: {type(e).__name__}: {e}") from e


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids of `messages` rendered by the tokenizer's chat template, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerError("this tokenizer has no chat template")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
