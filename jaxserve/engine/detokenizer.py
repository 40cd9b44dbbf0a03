"""Incremental detokenization with stop strings.

tokens -> tokenizers' DecodeStream (holds back bytes until they form whole UTF-8 characters)
       -> text; stop strings are searched across token boundaries in the text, and the
          stream exposes only text that cannot still turn into the start of a stop string.

Of several stop strings, the one that ends first in the text wins, as a reader taking the text
character by character would see it (so how the text splits into tokens does not change which);
of two that end at the same character, the longer (it starts earlier). Not the list's order:

    text " Paris", stop ["a", "P"] -> " " stopped by "P";  text "abc", stop ["bc", "abc"] -> "" by "abc"
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
        # Appended through a local that holds the only reference, so that CPython grows the string
        # in place instead of copying all the text so far for each token (~1.5 us a token by 10k).
        text, self.text = self.text, ""
        search_from = max(0, len(text) - self._hold)
        text += piece
        self.text = text
        if not self._stop:
            return None
        found = self._first_stop(search_from)
        if found is None:
            return None
        at, stop = found
        self.text = self.text[: at + (len(stop) if self._include_stop else 0)]
        self.stopped_by = stop
        return stop

    def _first_stop(self, search_from: int) -> tuple[int, str] | None:
        """(start, stop string) of the match that ends first (then starts first), if any."""
        matches = [(at, stop) for stop in self._stop if (at := self.text.find(stop, search_from)) != -1]
        return min(matches, key=lambda m: (m[0] + len(m[1]), m[0]), default=None)

    def visible_text(self, finished: bool) -> str:
        """Text safe to show now: while running, the tail that may begin a stop string is held back."""
        return self.text[: self.visible_len(finished)]

    def visible_len(self, finished: bool) -> int:
        """The length of visible_text(finished), without copying it."""
        if finished or self.stopped_by is not None or not self._hold:
            return len(self.text)
        return max(0, len(self.text) - self._hold)
