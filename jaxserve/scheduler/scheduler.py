"""The token-budget scheduler (vLLM v1's idea): no prefill or decode phases, only grants of tokens.

Each step, every request's num_computed_tokens catches up with the tokens it has:

    schedule(): running requests first, in admission order, each granted
                min(tokens it still lacks, budget left)  -> decode is a grant of 1, a long prompt
                gets chunks; then waiting requests, first come first served, while the budget,
                max_num_seqs and free pages allow. Grants advance num_computed_tokens at once,
                and a chunk that samples adds a pending token.
                Out of pages: preempt the most recently admitted running request (free its pages,
                recompute it later from the head of the queue). The oldest always progresses.
    update():   a chunk that sampled turns its pending token into a known one; the request may
                then finish (eos, stop token, length) and free its pages.

Async scheduling: step n+1 may be scheduled before step n's tokens are known. A decode grant on a
pending token is staged with the token left on the device, a request whose pending token will
reach its length limit is not granted more, and one that turns out to have stopped (eos) only
wastes that one row, whose token update() drops.

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
    page_ids: list[int]  # the request's live page list: read it when staging, right after schedule()
    samples: bool  # ends at the request's last token, so its logits pick the next one
    sample_index: int  # the output index of the token it samples (the sampling key's counter)


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
        self._removed: list[str] = []  # ids of requests removed since take_removed()
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
            dataclasses.replace(
                req, request_id=f"{req.request_id}#{i}", parent_id=req.request_id, index=i, output_token_ids=[]
            )
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
        prefix = dataclasses.replace(
            req, request_id=f"{req.request_id}#prefix", parent_id=req.request_id, prefix_len=shared, output_token_ids=[]
        )
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
            if n <= 0 or req.num_output_tokens >= req.max_output_tokens:
                i += 1  # waiting for its launched steps: a prefix about to fork, or a last token
                continue
            while not self.kv.allocate(req.request_id, req.num_computed_tokens + n):
                if self._evict_waiting_pages():
                    continue
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
        while req not in self.running and len(self.running) >= self.config.max_num_seqs:  # room for it
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
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
        """After a failed step (and with no other step in flight): these requests lose their pages
        and pending tokens and wait to be recomputed (a waiting one, e.g. an n > 1 child that
        forked onto shared pages, starts over too)."""
        for req in requests:
            req.num_pending = 0
            if req.status is RequestStatus.RUNNING:
                self.running.remove(req)
                self._preempt(req)
            elif not req.status.finished:
                self._drop_pages(req)

    def _chunk(self, req: Request, n: int) -> ScheduledChunk:
        start = req.num_computed_tokens
        samples = req.prefix_len is None and start + n == req.num_tokens
        chunk = ScheduledChunk(req, start, n, self.kv.table(req.request_id), samples, req.num_output_tokens)
        req.num_computed_tokens += n
        req.num_pending += samples
        return chunk

    def _evict_waiting_pages(self) -> bool:
        """Frees the pages of the newest waiting request that holds some (an n > 1 child that
        forked onto the prompt's shared pages and has not run yet): it will compute its prompt
        itself. Pages held by requests that cannot run would otherwise starve running ones.
        Returns whether any were freed."""
        for req in reversed(self.waiting):
            if self.kv.table(req.request_id):
                self._drop_pages(req)
                return True
        return False

    def _drop_pages(self, req: Request) -> None:
        """Frees the request's pages: its cache is gone, it recomputes from its first token."""
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0

    def _preempt(self, req: Request) -> None:
        self._drop_pages(req)
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
            if req.status.finished:  # aborted or finished meanwhile: its token is dropped
                continue
            if req.prefix_len is not None:
                # Fork once the chunk that completes the prompt's shared pages has run (its
                # computed count got there when it was scheduled, possibly a step earlier).
                if req.status is RequestStatus.RUNNING and chunk.start + chunk.num_tokens == req.prefix_len:
                    self._fork(req)
                continue
            if not chunk.samples:
                continue
            # A request preempted since keeps its token: it is recomputed with it.
            req.num_pending -= 1
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

    def take_removed(self) -> list[str]:
        """The requests finished, aborted or forked since the last call (their device rows can go)."""
        removed, self._removed = self._removed, []
        return removed

    def _remove(self, req: Request) -> None:
        self._removed.append(req.request_id)
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
