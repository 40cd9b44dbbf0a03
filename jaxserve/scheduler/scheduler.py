"""The token-budget scheduler (vLLM v1's idea): no prefill or decode phases, only grants of tokens.

Each step, every request's num_computed_tokens catches up with the tokens it has:

    schedule(): running requests first, in admission order, each granted
                min(tokens it still lacks, budget left)  -> decode is a grant of 1, a long prompt
                gets chunks; then waiting requests, first come first served, while the budget,
                max_num_seqs and free pages allow.
                Out of pages: preempt the most recently admitted running request (free its pages,
                recompute it later from the head of the queue). The oldest always progresses.
    update():   advance num_computed_tokens; a request whose cache caught up takes its sampled
                token, then may finish (eos, stop token, length) and free its pages.

n > 1: a prompt is computed once. A prefix request computes the prompt's full pages (all but the
page holding its last token); then n children share those pages and each computes the rest
(1 to page_size tokens) itself before sampling on its own.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from jaxserve.scheduler.kv_pages import KVPageManager
from jaxserve.scheduler.request import Request, RequestStatus


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    request: Request
    start: int  # first position computed this step
    num_tokens: int  # q_len
    page_ids: tuple[int, ...]

    @property
    def samples(self) -> bool:
        """Whether this chunk ends at the request's last token, so its logits pick the next one."""
        req = self.request
        return req.prefix_len is None and self.start + self.num_tokens == req.num_tokens


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVPageManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every live request, children and prefixes included
        self._forks: dict[str, list[Request]] = {}  # prefix request id -> children waiting for it
        self.num_preemptions = 0
        # Families under suspicion after a failed step: each runs alone until a step succeeds.
        self.quarantine: set[str] = set()

    # -- requests in -----------------------------------------------------------------------
    def add_request(self, req: Request) -> list[Request]:
        """Queues req (or, for n > 1, its prefix and children); returns the requests that sample."""
        n = req.sampling_params.n
        if n == 1:
            self._enqueue(req)
            return [req]
        children = [
            dataclasses.replace(req, request_id=f"{req.request_id}#{i}", parent_id=req.request_id, index=i,
                                output_token_ids=[])
            for i in range(n)
        ]
        shared = (req.num_prompt_tokens - 1) // self.kv.page_size * self.kv.page_size
        params = req.sampling_params
        if shared == 0 or params.has_penalties or params.prompt_logprobs is not None:
            # Nothing worth sharing (the prompt fits in one page), or each child must see the whole
            # prompt itself (penalty statistics, prompt logprobs): each computes it.
            for child in children:
                self._enqueue(child)
            return children
        prefix = dataclasses.replace(req, request_id=f"{req.request_id}#prefix", parent_id=req.request_id,
                                     prefix_len=shared, output_token_ids=[])
        self._forks[prefix.request_id] = children
        for child in children:
            self.requests[child.request_id] = child
        self._enqueue(prefix)
        return children

    def _enqueue(self, req: Request) -> None:
        self.requests[req.request_id] = req
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    # -- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        if self.quarantine:
            return self._schedule_quarantined()
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.target_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req.request_id, req.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                chunks.append(self._chunk(req, n))
                budget -= n
                i += 1
        # Admit new work only in a step that preempted nothing: pages are scarce otherwise.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            n = min(req.target_tokens - req.num_computed_tokens, budget)
            if not self.kv.allocate(req.request_id, req.num_computed_tokens + n):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chunks.append(self._chunk(req, n))
            budget -= n
        return SchedulerOutput(chunks, preempted)

    def _schedule_quarantined(self) -> SchedulerOutput:
        """One request of a suspected family, alone in the step, so that a failure names it."""
        req = next((r for r in [*self.running, *self.waiting] if r.family_id in self.quarantine), None)
        if req is None:  # the suspects finished or were aborted
            self.quarantine.clear()
            return self.schedule()
        n = min(req.target_tokens - req.num_computed_tokens, self.config.max_num_batched_tokens)
        preempted = []
        while not self.kv.allocate(req.request_id, req.num_computed_tokens + n):
            victim = next(r for r in reversed(self.running) if r is not req)  # alone it always fits
            self.running.remove(victim)
            self._preempt(victim)
            preempted.append(victim)
        if req in self.waiting:
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
        return SchedulerOutput([self._chunk(req, n)], preempted)

    def retry(self, requests: list[Request]) -> None:
        """After a failed step: these requests lose their pages and wait to be recomputed."""
        for req in requests:
            if req.status is RequestStatus.RUNNING:
                self.running.remove(req)
                self._preempt(req)

    def _chunk(self, req: Request, n: int) -> ScheduledChunk:
        return ScheduledChunk(req, req.num_computed_tokens, n, tuple(self.kv.table(req.request_id)))

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Applies a step's results (sampled: request id -> token, for chunks that sample).
        Returns the requests that got a new token; finished ones are already freed."""
        advanced = []
        for chunk in output.chunks:
            req = chunk.request
            self.quarantine.discard(req.family_id)  # its step succeeded
            if req.status is not RequestStatus.RUNNING:  # aborted or finished meanwhile
                continue
            req.num_computed_tokens += chunk.num_tokens
            if req.prefix_len is not None:
                if req.num_computed_tokens == req.prefix_len:
                    self._fork(req)
                continue
            if not chunk.samples:
                continue
            token = sampled[req.request_id]
            req.output_token_ids.append(token)
            advanced.append(req)
            self._check_stop(req, token)
        return advanced

    def _check_stop(self, req: Request, token: int) -> None:
        params = req.sampling_params
        n_out = len(req.output_token_ids)
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token in req.eos_token_ids:
                return self.finish(req.request_id, RequestStatus.FINISHED_STOPPED)
            if token in params.stop_token_ids:
                return self.finish(req.request_id, RequestStatus.FINISHED_STOPPED, stop_reason=token)
        if n_out >= req.max_output_tokens:
            self.finish(req.request_id, RequestStatus.FINISHED_LENGTH)

    def _fork(self, prefix: Request) -> None:
        children = self._forks.pop(prefix.request_id)
        for child in reversed(children):  # at the head of the queue, in index order
            self.kv.share(child.request_id, prefix.request_id, prefix.prefix_len // self.kv.page_size)
            child.num_computed_tokens = prefix.prefix_len
            child.status = RequestStatus.WAITING
            self.waiting.appendleft(child)
        self._remove(prefix)

    # -- requests out ------------------------------------------------------------------------
    def finish(self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        req = self.requests.get(request_id)
        if req is None or req.status.finished:
            return
        req.status = status
        req.stop_reason = stop_reason
        self._remove(req)

    def abort(self, family_id: str) -> list[Request]:
        """Aborts a request and everything made from it (n > 1 children, prefix). Returns them."""
        members = [r for r in self.requests.values() if r.family_id == family_id]
        for req in members:
            self._forks.pop(req.request_id, None)
            req.status = RequestStatus.FINISHED_ABORTED
            self._remove(req)
        return [r for r in members if r.prefix_len is None]

    def _remove(self, req: Request) -> None:
        if not req.status.finished:  # a prefix request, done once its children forked
            req.status = RequestStatus.FINISHED_STOPPED
        self.kv.free(req.request_id)
        self.requests.pop(req.request_id, None)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)
