"""A token's own bytes, and the string that names it in logprobs (OpenAI's `bytes` and `token`).

The engine names a token by decoding it alone, which turns a piece of a multi-byte character into
U+FFFD. Here the bytes come from the token's piece in the tokenizer's vocabulary instead:

    byte-level BPE (GPT-2, Llama 3, SmolLM2)  each character of the piece stands for one byte
                                              (GPT-2's bytes<->unicode table): "ðŁ" -> F0 9F
    SentencePiece with byte fallback          "<0xE2>" -> E2; "▁" stands for a space
    added tokens ("<|im_end|>")               their text, as UTF-8

    "👩" = F0 9F 91 A9 -> SmolLM2 pieces "ðŁ" "ĳ" "©" -> bytes [240, 159] [145] [169]

The token string is the bytes as text when they are valid UTF-8; otherwise every byte escaped
after a "bytes:" prefix ("bytes:\\xf0\\x9f"), the spelling of OpenAI's legacy completions, so
that a string never claims characters its bytes do not hold.
"""

from __future__ import annotations

import json
import re

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPIECE_SPACE = "\u2581"  # "▁"


def _decoder_kinds(tokenizer) -> set[str]:
    """The types of the tokenizer's decoders ({"ByteLevel"}, {"Replace", "ByteFallback", ...})."""
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    return {part.get("type") for part in parts}


def token_name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class TokenBytes:
    """token id -> its bytes and its name, from a transformers tokenizer (built once per server)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        kinds = _decoder_kinds(tokenizer)
        self._byte_fallback = "ByteFallback" in kinds
        self._byte_of_char = None
        if "ByteLevel" in kinds:
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            self._byte_of_char = {char: byte for byte, char in bytes_to_unicode().items()}
        self._added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        self._cache: dict[int, bytes | None] = {}

    def bytes_of(self, token_id: int) -> bytes | None:
        """The token's bytes; None for an id the tokenizer does not know."""
        if token_id not in self._cache:
            self._cache[token_id] = self._piece_bytes(token_id)
        return self._cache[token_id]

    def name(self, token_id: int) -> str | None:
        raw = self.bytes_of(token_id)
        return None if raw is None else token_name(raw)

    def _piece_bytes(self, token_id: int) -> bytes | None:
        if token_id in self._added:
            return self._added[token_id].encode()
        if not 0 <= token_id < len(self._tokenizer):
            return None
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return None
        if self._byte_of_char is not None and all(c in self._byte_of_char for c in piece):
            return bytes(self._byte_of_char[c] for c in piece)
        if self._byte_fallback and (byte := _BYTE_PIECE.fullmatch(piece)):
            return bytes([int(byte.group(1), 16)])
        return piece.replace(_SPIECE_SPACE, " ").encode()
