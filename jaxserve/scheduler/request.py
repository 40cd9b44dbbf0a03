"""A request as the scheduler sees it: token ids, progress, status."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # pages freed; waits at the head of the queue to be recomputed
    FINISHED_STOPPED = "stop"  # eos, a stop token id or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED})


@dataclasses.dataclass(eq=False, slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any  # jaxserve.sampling_params.SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0  # tokens in the cache, counting those of steps already launched
    num_pending: int = 0  # tokens sampled by launched steps, not yet read back (async scheduling)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    seed: int = 0  # the sampling key's seed: the user's, or drawn by the engine
    # n > 1: the children that sample share the pages of a parent "prefix" request that only
    # computes the prompt's full pages (see Scheduler.add_request).
    parent_id: str | None = None
    index: int = 0
    prefix_len: int | None = None  # set on a prefix request: compute this many tokens, then fork
    # Prefix caching (kv_pages.py): the cache entries of its first pages, in order; the computed
    # count at which its next page is full (the scheduler's: NEVER with caching off); the tokens
    # found cached when first admitted (-1: not admitted yet).
    cache_entries: list[int] = dataclasses.field(default_factory=list)
    cache_next: int = 1 << 62
    num_cached_tokens: int = -1
    scheduled_at: float | None = None  # when first admitted (time.perf_counter): its queue time ends
    # Constant for the request's life, computed once (the scheduler reads them every step).
    num_prompt_tokens: int = dataclasses.field(init=False)
    max_output_tokens: int = dataclasses.field(init=False)
    may_stop_on: frozenset[int] = dataclasses.field(init=False)  # eos and stop ids: a token outside never stops it

    def __post_init__(self):
        self.num_prompt_tokens = len(self.prompt_token_ids)
        limit = self.max_model_len - self.num_prompt_tokens
        mt = self.sampling_params.max_tokens
        self.max_output_tokens = limit if mt is None else min(mt, limit)
        self.may_stop_on = self.eos_token_ids | frozenset(self.sampling_params.stop_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt and output tokens, the pending ones (ids still on the device) included."""
        return self.num_prompt_tokens + len(self.output_token_ids) + self.num_pending

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output, without joining the two lists (a decode step
        asks for one token of a long sequence)."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return self.output_token_ids[start - p : stop - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - p]

    @property
    def target_tokens(self) -> int:
        """Tokens to have in the cache before this request samples (or forks)."""
        return self.prefix_len if self.prefix_len is not None else self.num_tokens

    @property
    def family_id(self) -> str:
        return self.parent_id or self.request_id


def check_request_id(request_id: str) -> None:
    """A user's request id may not contain '#': the ids of a request's samples are id#0, id#1, ..."""
    if "#" in request_id:
        raise ValueError(f"request id {request_id!r}: '#' is reserved for the ids of a request's samples")


def sample_ids(request_id: str, n: int) -> list[str]:
    """The ids of a request's samples: itself, or for n > 1 one child per sample."""
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]
