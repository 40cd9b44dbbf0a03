"""Structured outputs: grammars compiled by llguidance, a matcher per constrained request, and the
packed bitmask of the tokens each may take next.

    StructuredOutputsParams --GrammarCompiler.compile--> a validated grammar (ValueError names the
        problem; cached by its spec, LRU), checked when the request is prepared, before queueing
    EngineCore.add_request  --Matchers.add--> one matcher per sample (a copy of the cached one)
    after each step         --Matchers.accept--> each constrained request's new token advances its
        matcher (exactly once per token: only tokens Scheduler.update appended); a grammar that is
        complete ends its request ("stop")
    before each sampler     --Matchers.bitmask--> GrammarBitmask: [n, W] int32 for the step's
        constrained grants that sample (W = ceil(V / 32), V the model's logits width); the runner
        scatters it into an all-ones [R, W] array for the sampler

A mask needs the request's previous token, which may still be on the device: EngineCore launches
a step's model program first and its sampler only once the step before has been read back and
its tokens accepted (core.py), so no mask ever lags a token.
Token ids past the tokenizer's vocabulary (the model's padded rows) stay 0 in a constrained row.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading

import numpy as np

from jaxserve.sampling_params import StructuredOutputsParams

CACHE_SIZE = 256  # compiled grammars kept, least recently used out first


@dataclasses.dataclass(frozen=True, slots=True)
class GrammarBitmask:
    """The masks of one step, for the runner: seqs[i] is the step's sequence that words[i] masks."""

    seqs: np.ndarray  # [n] i32
    words: np.ndarray  # [n, W] i32, bit b of word w allows token 32 * w + b


def grammar_of(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON form) of a spec; not validated yet."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import gbnf_to_lark

    kind = spec.kind
    if kind == "json" or kind == "json_object":
        schema = {"type": "object"} if kind == "json_object" else spec.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError("structured_outputs.json must be a JSON schema object")
        # Compact JSON: a small model offered free whitespace may write nothing else.
        return LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec.regex)
    if kind == "choice":
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    text = spec.grammar
    if "::=" in text:  # GBNF (llama.cpp's, vLLM's xgrammar examples)
        try:
            text = gbnf_to_lark(text)
        except Exception as e:
            raise ValueError(f"structured_outputs.grammar: {e}") from None
    return LLMatcher.grammar_from_lark(text)


class GrammarCompiler:
    """Specs -> compiled matchers in their initial state, for one tokenizer. Thread-safe (the
    server prepares requests in worker threads)."""

    def __init__(self, tokenizer, vocab_size: int):
        self._hf_tokenizer = tokenizer
        self._tokenizer = None  # llguidance's, built on first use (about a second)
        self.vocab_size = vocab_size  # the model's logits width
        self.words = -(-vocab_size // 32)
        self._cache: collections.OrderedDict[tuple[str, str], object] = collections.OrderedDict()
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer)
                except ValueError as e:
                    raise ValueError(f"structured outputs need a fast (Rust) tokenizer: {e}") from None
            return self._tokenizer

    @property
    def tokenizer_words(self) -> int:
        return -(-self.tokenizer.vocab_size // 32)

    def compile(self, spec: StructuredOutputsParams):
        """A fresh matcher for spec; ValueError if the grammar is invalid."""
        from llguidance import LLMatcher

        key = spec.key()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached.deep_copy()
        try:
            grammar = grammar_of(spec)
        except ValueError as e:
            raise ValueError(f"invalid structured output ({spec.kind}): {e}") from None
        tokenizer = self.tokenizer
        matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid structured output ({spec.kind}): {matcher.get_error().strip()}")
        with self._lock:
            self._cache[key] = matcher
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher.deep_copy()

    @property
    def cache_size(self) -> int:
        return len(self._cache)


class Matchers:
    """The live matchers, by request id (sample ids for n > 1), on the engine's thread."""

    def __init__(self, compiler: GrammarCompiler):
        from llguidance import LLExecutor

        self.compiler = compiler
        self._by_id: dict[str, object] = {}
        self._executor = LLExecutor()
        self._scratch = np.zeros((0, 0), np.int32)

    def add(self, request_ids: list[str], spec: StructuredOutputsParams, first=None) -> None:
        """A matcher per sample; `first` (compiled already) goes to the first."""
        for i, request_id in enumerate(request_ids):
            self._by_id[request_id] = first if i == 0 and first is not None else self.compiler.compile(spec)

    def __bool__(self) -> bool:
        return bool(self._by_id)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    def retain(self, live) -> None:
        """Forgets the matchers of requests no longer live (finished, aborted)."""
        for request_id in [r for r in self._by_id if r not in live]:
            del self._by_id[request_id]

    def accept(self, request_ids: list[str], tokens: list[int], advanced: list[int]) -> list[str]:
        """Advances the matchers of the grants that got a token; returns the ids whose grammar is
        now complete, or broken (a token the mask forbade: only min_tokens' eos ban can force one)."""
        done = []
        by_id = self._by_id
        for i in advanced:
            matcher = by_id.get(request_ids[i])
            if matcher is None:
                continue
            matcher.consume_token(tokens[i])
            if matcher.is_stopped():  # complete, or in error (it never leaves an error state)
                done.append(request_ids[i])
        return done

    def bitmask(self, request_ids: list[str], samples: list[bool]) -> GrammarBitmask | None:
        """The masks of the step's constrained grants that sample (None: no such grant)."""
        by_id = self._by_id
        seqs = [i for i, (rid, s) in enumerate(zip(request_ids, samples)) if s and rid in by_id]
        if not seqs:
            return None
        from llguidance.numpy import fill_next_token_bitmask_par

        n = len(seqs)
        if self._scratch.shape[0] < n:
            self._scratch = np.zeros((max(n, 2 * self._scratch.shape[0]), self.compiler.tokenizer_words), np.int32)
        scratch = self._scratch[:n]
        fill_next_token_bitmask_par(self._executor, [(by_id[request_ids[i]], j) for j, i in enumerate(seqs)], scratch)
        words = np.zeros((n, self.compiler.words), np.int32)  # ids past the tokenizer's: never allowed
        width = min(self.compiler.words, self.compiler.tokenizer_words)
        words[:, :width] = scratch[:, :width]
        last_bits = self.compiler.vocab_size % 32
        if self.compiler.tokenizer.vocab_size > self.compiler.vocab_size and last_bits:
            words[:, -1] &= (1 << last_bits) - 1  # the logits' last word: bits past V are not tokens
        return GrammarBitmask(np.asarray(seqs, np.int32), words)
