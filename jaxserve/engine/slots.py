"""Request slots: the device rows a request owns while it runs, and its per-slot host record.

A request takes a slot the first time it is scheduled and gives it back when it finishes, is
preempted or is aborted. The slot indexes its row of the device page table and of the penalty
statistics. On the host, the slot's entries in SlotParams hold what staging needs of the request
every step (its sampling parameters, prompt length, pages already on the device), written once
when the slot is taken, so that a step is staged by gathering rows, not by walking requests.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class SlotParams:
    """Per-slot copies of each request's constant sampling parameters ([num_slots] each)."""

    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    min_p: np.ndarray
    repetition_penalty: np.ndarray
    presence_penalty: np.ndarray
    frequency_penalty: np.ndarray
    seed: np.ndarray
    wants_logprobs: np.ndarray
    has_penalties: np.ndarray
    needs_bias: np.ndarray  # logit_bias, or min_tokens suppressing eos/stop ids
    needs_sort: np.ndarray  # top_k/top_p/min_p sampling or top logprobs: the full sampler
    num_prompt_tokens: np.ndarray
    processor_mask: np.ndarray  # [num_processors, num_slots]
    synced_pages: np.ndarray  # pages of its page-table row already written on the device

    @classmethod
    def empty(cls, num_slots: int, num_processors: int) -> SlotParams:
        f32, i32 = (lambda: np.zeros(num_slots, np.float32)), (lambda: np.zeros(num_slots, np.int32))  # noqa: E731
        b = lambda: np.zeros(num_slots, bool)  # noqa: E731
        return cls(
            temperature=f32(),
            top_k=i32(),
            top_p=f32(),
            min_p=f32(),
            repetition_penalty=f32(),
            presence_penalty=f32(),
            frequency_penalty=f32(),
            seed=np.zeros(num_slots, np.uint32),
            wants_logprobs=b(),
            has_penalties=b(),
            needs_bias=b(),
            needs_sort=b(),
            num_prompt_tokens=i32(),
            processor_mask=np.zeros((num_processors, num_slots), bool),
            synced_pages=i32(),
        )


class RequestSlots:
    def __init__(self, num_slots: int, vocab_size: int, processor_names: list[str]):
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.of: dict[str, int] = {}
        self.vocab_size = vocab_size
        self.processor_names = processor_names
        self.params = SlotParams.empty(num_slots, len(processor_names))

    def acquire(self, request) -> int:
        """The request's slot, taking a free one (and recording the request in it) if it has none."""
        slot = self.of.get(request.request_id)
        if slot is None:
            if not self._free:
                raise RuntimeError("no free request slot: more running requests than max_num_seqs")
            slot = self.of[request.request_id] = self._free.pop()
            self._record(slot, request)
        return slot

    def _record(self, slot: int, request) -> None:
        p, s = request.sampling_params, self.params
        s.temperature[slot], s.top_p[slot], s.min_p[slot] = p.temperature, p.top_p, p.min_p
        s.top_k[slot] = self.vocab_size if p.top_k == -1 else min(p.top_k, self.vocab_size)
        s.repetition_penalty[slot], s.presence_penalty[slot], s.frequency_penalty[slot] = (
            p.repetition_penalty,
            p.presence_penalty,
            p.frequency_penalty,
        )
        s.seed[slot] = request.seed
        s.wants_logprobs[slot] = p.logprobs is not None
        s.has_penalties[slot] = p.has_penalties
        s.needs_bias[slot] = bool(p.logit_bias) or p.min_tokens > 0
        cuts = -1 < p.top_k < self.vocab_size or p.top_p < 1 or p.min_p > 0
        s.needs_sort[slot] = (p.temperature > 0 and cuts) or bool(p.logprobs)
        s.num_prompt_tokens[slot] = request.num_prompt_tokens
        for j, name in enumerate(self.processor_names):
            s.processor_mask[j, slot] = name in p.logits_processors
        s.synced_pages[slot] = 0

    def release(self, request_id: str) -> None:
        slot = self.of.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)

    @property
    def num_free(self) -> int:
        return len(self._free)
