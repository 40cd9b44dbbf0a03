"""Incremental detokenization with stop strings.

tokens -> tokenizers' DecodeStream (holds back bytes until they form whole UTF-8 characters)
       -> text; stop strings are searched across token boundaries in the text, and the
          stream exposes only text that cannot still turn into the start of a stop string.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer, *, skip_special_tokens: bool = True, stop: list[str] = (), include_stop: bool = False
    ):
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._stop = list(stop)
        self._include_stop = include_stop
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        self.stopped_by: str | None = None

    def push(self, token_id: int) -> str | None:
        """Adds one token; returns the stop string it completed, if any (text is then final)."""
        if self.stopped_by is not None:
            return self.stopped_by
        piece = self._stream.step(self._backend, token_id)
        if not piece:
            return None
        search_from = max(0, len(self.text) - self._hold)
        self.text += piece
        for stop in self._stop:
            at = self.text.find(stop, search_from)
            if at != -1:
                self.text = self.text[: at + (len(stop) if self._include_stop else 0)]
                self.stopped_by = stop
                return stop
        return None

    def visible_text(self, finished: bool) -> str:
        """Text safe to show now: while running, the tail that may begin a stop string is held back."""
        if finished or self.stopped_by is not None or not self._hold:
            return self.text
        return self.text[: max(0, len(self.text) - self._hold)]
