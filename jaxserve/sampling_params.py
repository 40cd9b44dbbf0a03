"""SamplingParams: how one request's tokens are chosen and when it stops. Pure data, validated."""

from __future__ import annotations

import dataclasses
import enum
import json as _json
from collections.abc import Sequence

MAX_LOGPROBS = 20  # top alternatives returned per token (OpenAI's top_logprobs cap)
MAX_LOGIT_BIAS = 300  # entries in logit_bias (OpenAI's cap)
MAX_STOP_TOKEN_IDS = 64
# A temperature below this samples as greedy (as vLLM): dividing logits by 1e-40 gives inf - inf = NaN.
GREEDY_BELOW_TEMPERATURE = 1e-5


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a request holds (vLLM's names and values)."""

    CUMULATIVE = 0  # everything so far, every step (each output is a snapshot)
    DELTA = 1  # what is new since the previous output: new text, token ids and logprobs
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """A grammar the output must match (vLLM's field names); exactly one is set.

    json: a JSON schema (dict, or its JSON text); json_object: any JSON object; regex: a regular
    expression (Rust regex syntax); choice: one of these strings exactly; grammar: a Lark grammar
    (llguidance's dialect; GBNF with `::=` rules is converted)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self):
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [name for name in KINDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured_outputs needs exactly one of {', '.join(KINDS)}; got {', '.join(given) or 'none'}"
            )
        kind = given[0]
        value = getattr(self, kind)
        if kind == "json" and not isinstance(value, (dict, str)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (an object), got {type(value).__name__}")
        if kind in ("regex", "grammar") and (not isinstance(value, str) or not value):
            raise ValueError(f"structured_outputs.{kind} must be a non-empty string")
        if kind == "choice" and (not value or not all(isinstance(c, str) and c for c in value)):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
        if kind == "json_object" and value is not True:
            raise ValueError("structured_outputs.json_object must be true")

    @property
    def kind(self) -> str:
        return next(name for name in KINDS if getattr(self, name) not in (None, False))

    def key(self) -> tuple[str, str]:
        """A hashable spelling of the grammar (the compiled-grammar cache's key)."""
        kind, value = self.kind, getattr(self, self.kind)
        return kind, _json.dumps(value, sort_keys=True) if kind in ("json", "choice") else str(value)


KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclasses.dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0 in vLLM's older spelling is refused): no limit
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and output
    presence_penalty: float = 0.0  # OpenAI's, on output tokens
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives per output token (0: just the chosen one)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logits_processors: Sequence[str] = ()  # names of processors registered with the engine
    # Prefix caching: requests share cached KV only with requests of the same salt (None: the
    # unsalted ones); tenants who must not share cache entries send different salts.
    cache_salt: str | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Constrained decoding: every output token keeps the text inside this grammar.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        self.logits_processors = tuple(self.logits_processors)
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self._validate()
        if self.temperature < GREEDY_BELOW_TEMPERATURE:
            self.temperature = 0.0

    def _validate(self) -> None:
        def bad(name, value, rule):
            raise ValueError(f"{name} must be {rule}, got {value!r}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", self.n, "an integer >= 1")
        if not self.temperature >= 0:
            bad("temperature", self.temperature, ">= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "in (0, 1]")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            bad("top_k", self.top_k, "-1 (disabled) or >= 1")
        if not 0 <= self.min_p <= 1:
            bad("min_p", self.min_p, "in [0, 1]")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", self.repetition_penalty, "> 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(name, getattr(self, name), "in [-2, 2]")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            bad("logit_bias", f"{len(self.logit_bias)} entries", f"at most {MAX_LOGIT_BIAS} entries")
        if any(not -100 <= v <= 100 for v in self.logit_bias.values()):
            bad("logit_bias", self.logit_bias, "values in [-100, 100]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", self.max_tokens, "an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                bad(name, value, f"an integer in [0, {MAX_LOGPROBS}]")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad("stop_token_ids", f"{len(self.stop_token_ids)} ids", f"at most {MAX_STOP_TOKEN_IDS} ids")
        if any(not s for s in self.stop):
            bad("stop", self.stop, "non-empty strings")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", self.seed, "an integer")
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not self.cache_salt):
            bad("cache_salt", self.cache_salt, "a non-empty string")
        if not isinstance(self.output_kind, RequestOutputKind):
            bad("output_kind", self.output_kind, "a RequestOutputKind")
        so = self.structured_outputs
        if so is not None and not isinstance(so, StructuredOutputsParams):
            bad("structured_outputs", so, "a StructuredOutputsParams")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
