"""The one handoff from the scheduler to the model runner, one way, plain data (vLLM v1's shape).

    SchedulerOutput
      removed_ids      requests gone since the last output (finished, aborted, preempted, forked):
                       the runner frees their rows before anything else
      new_requests     requests the runner has no row for (admitted, or re-admitted after a
                       preemption): everything about them, copied
      grants, in the step's order (one entry per scheduled request, new or running):
        request_ids, num_scheduled_tokens (q_len), num_computed_tokens (tokens already in the
        cache: the first position computed), samples (the grant ends at the request's last token,
        so its logits pick the next one), new_page_ids (pages added since the request's last
        grant; [] for a new request, whose pages are in its NewRequestData)

Scheduler.update() answers each step with an UpdateResult: which grants got their token and
which requests finished.

Nothing in it aliases the scheduler's state: lists are copies, and the runner never sees a
Request. Tokens of running requests are not sent: the runner keeps every token it was given or
sampled itself (a decode step's input is the token the step before sampled, possibly still on the
device).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True, slots=True)
class NewRequestData:
    request_id: str
    token_ids: list[int]  # the prompt, then the outputs known when scheduled (a resumed request)
    num_prompt_tokens: int
    sampling_params: Any  # jaxserve.sampling_params.SamplingParams
    seed: int
    page_ids: list[int]  # its pages so far, shared ones (n > 1) included


@dataclasses.dataclass(frozen=True, slots=True)
class SchedulerOutput:
    removed_ids: list[str]
    new_requests: list[NewRequestData]
    request_ids: list[str]  # [R] the step's grants, in order
    num_scheduled_tokens: list[int]  # [R]
    num_computed_tokens: list[int]  # [R]
    samples: list[bool]  # [R]
    new_page_ids: list[Sequence[int]]  # [R]
    num_tokens: int  # sum of num_scheduled_tokens

    @property
    def num_rows(self) -> int:
        return len(self.request_ids)


@dataclasses.dataclass(frozen=True, slots=True)
class UpdateResult:
    """What a step's tokens did (Scheduler.update): the grants whose request got its token, and
    which of those requests finished, with (finish reason, stop reason)."""

    advanced: list[int]  # positions in the step's grants
    finished: dict[str, tuple[str, int | str | None]]  # request id -> ("stop" | "length", stop token id)
    gone: set[str]  # ids of the step's requests that had ended before it was read back: what it
    # computed for them (logprobs) must not reach a new request that reuses the id
