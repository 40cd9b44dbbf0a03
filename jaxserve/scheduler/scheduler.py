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
(1 to page_size tokens) itself before sampling on its own. Child i samples with seed + i * 0x9E3779B9.

Prefix caching (kv_pages.py): a request admitted with nothing computed first looks up the longest
run of cached full pages matching its tokens (always leaving its last token to compute: it must
sample), takes them and starts with num_computed_tokens past them. At the end of each schedule(),
the full pages of the requests it granted whose tokens are all known and computed are cached;
so are a request's last full pages when it leaves. A page computed by this step is thus found by
the next schedule() at the earliest, i.e. by a step the device runs after this one. Requests with
penalties or prompt logprobs take no hit (the device counts, and scores, every prompt token as it
enters the model); a prefix request that finds all its pages cached forks at once. After a failed
step every cache entry is forgotten (retry): what the failed step computed may be lost.

What leaves the scheduler is plain data: a SchedulerOutput per step (output.py) and, from
update(), the positions in that step of the requests that got a token. Request objects stay here.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Sequence

from jaxserve.scheduler.kv_pages import NO_PAGES, KVPageManager
from jaxserve.scheduler.output import NewRequestData, SchedulerOutput, UpdateResult
from jaxserve.scheduler.request import FINISHED, Request, RequestStatus, sample_ids

CHILD_SEED_STRIDE = 0x9E3779B9  # child i of an n > 1 request samples with seed + i * stride
NEVER = 1 << 62  # Request.cache_next with caching off
RUNNING = RequestStatus.RUNNING


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int


@dataclasses.dataclass
class PrefixCacheStats:
    """Lookups at admission, in tokens (vLLM's prefix_cache_queries / prefix_cache_hits)."""

    queries: int = 0  # tokens of the requests that looked up (prompt + outputs known)
    hits: int = 0  # of which found cached


class _Grants:
    """The step being scheduled: its grants, in order. Almost every grant is a decode grant (one
    token, which samples, on the pages the request holds) and records its start alone; any other
    records the columns where it differs in `other`. columns() builds SchedulerOutput's columns:
    the decode values in C (a list repeated), the others written over them."""

    def __init__(self):
        self.new: list[NewRequestData] = []
        self.starts: list[int] = []
        self.other: list[tuple[int, int, bool, Sequence[int]]] = []  # (position, q_len, samples, new pages)

    def add(self, start: int, q_len: int, samples: bool, new_pages: Sequence[int]) -> None:
        if q_len != 1 or not samples or new_pages is not NO_PAGES:
            self.other.append((len(self.starts), q_len, samples, new_pages))
        self.starts.append(start)

    def columns(self) -> tuple[list[int], list[bool], list[Sequence[int]], int]:
        """(q_lens, samples, new pages, tokens) of the grants."""
        n = len(self.starts)
        q_lens, samples, new_pages = [1] * n, [True] * n, [NO_PAGES] * n
        num_tokens = n
        for i, q_len, sampled, pages in self.other:
            q_lens[i], samples[i], new_pages[i] = q_len, sampled, pages
            num_tokens += q_len - 1
        return q_lens, samples, new_pages, num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVPageManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every live request, children and prefixes included
        self.num_preemptions = 0
        self._forks: dict[str, list[Request]] = {}  # prefix request id -> children waiting for it
        self._removed: list[str] = []  # ids removed since the last SchedulerOutput
        self._issued: deque[tuple[SchedulerOutput, list[Request]]] = deque()  # outputs awaiting update()
        # Requests under suspicion after a failed step, with the position their failed grant
        # reached: each runs alone until a step of it gets that far.
        self._quarantine: dict[str, int] = {}
        self.prefix_cache = PrefixCacheStats()
        self._new_cached: dict[str, int] = {}  # family id -> tokens found cached, since take_num_cached_tokens
        self._new_scheduled: dict[str, float] = {}  # family id -> when first admitted, since take_scheduled
        # Requests whose grants completed a page not cached yet (a dict: each once, in order)
        self._to_cache: dict[Request, None] = {}

    # -- requests in -----------------------------------------------------------------------
    def add_request(self, req: Request) -> list[str]:
        """Queues req (or, for n > 1, its prefix and children); returns the ids of the requests
        that sample, in sample order."""
        n = req.sampling_params.n
        if n == 1:
            self._enqueue(req)
            return [req.request_id]
        children = [
            dataclasses.replace(
                req,
                request_id=child_id,
                parent_id=req.request_id,
                index=i,
                output_token_ids=[],
                cache_entries=[],
                seed=(req.seed + i * CHILD_SEED_STRIDE) % 2**32,
            )
            for i, child_id in enumerate(sample_ids(req.request_id, n))
        ]
        shared = (req.num_prompt_tokens - 1) // self.kv.page_size * self.kv.page_size
        params = req.sampling_params
        if shared == 0 or params.has_penalties or params.prompt_logprobs is not None:
            # Nothing worth sharing (the prompt fits in one page), or each child must see the whole
            # prompt itself (penalty statistics, prompt logprobs): each computes it.
            for child in children:
                self._enqueue(child)
        else:
            prefix = dataclasses.replace(
                req,
                request_id=f"{req.request_id}#prefix",
                parent_id=req.request_id,
                prefix_len=shared,
                output_token_ids=[],
                cache_entries=[],
            )
            self._forks[prefix.request_id] = children
            for child in children:
                self.requests[child.request_id] = child
            self._enqueue(prefix)
        return [c.request_id for c in children]

    def _enqueue(self, req: Request) -> None:
        self._chain(req, [])
        self.requests[req.request_id] = req
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    # -- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        grants = _Grants()
        if self._quarantine:
            requests = self._schedule_quarantined(grants)
        else:
            requests = self._schedule(grants)
        q_lens, samples, new_pages, num_tokens = grants.columns()
        out = SchedulerOutput(
            removed_ids=self._removed,
            new_requests=grants.new,
            request_ids=[r.request_id for r in requests],
            num_scheduled_tokens=q_lens,
            num_computed_tokens=grants.starts,
            samples=samples,
            new_page_ids=new_pages,
            num_tokens=num_tokens,
        )
        self._removed = []
        if requests:
            self._issued.append((out, requests))
            if self._to_cache:
                self._cache_completed_pages()
        return out

    def _cache_completed_pages(self) -> None:
        """Caches the pages that grants completed, once their tokens are known; keeps the requests
        whose completed pages are not all cached yet."""
        waiting_for_tokens = {}
        for req in self._to_cache:
            if req.status is not RUNNING:
                continue  # finished (its last pages cached as it left) or preempted (nothing computed)
            if req.num_prompt_tokens + len(req.output_token_ids) < req.cache_next <= req.num_computed_tokens:
                # The next page is computed but its last token is not known (still on the device):
                # nothing to cache yet, decided without a call (a decode row, the step its page fills).
                waiting_for_tokens[req] = None
            elif not self._cache_pages(req):
                waiting_for_tokens[req] = None
        self._to_cache = waiting_for_tokens

    def _schedule(self, grants: _Grants) -> list[Request]:
        budget = self.config.max_num_batched_tokens
        scheduled: list[Request] = []
        preempted = False
        allocate, page_size = self.kv.allocate, self.kv.page_size
        running, grant, to_cache = self.running, self._grant, self._to_cache
        starts, no_pages = grants.starts, NO_PAGES
        # The hot loop of a step (once per running request): keep it lean. Iterating over
        # `running` while preempting is safe: victims are popped from its end, down to the request
        # being granted at the latest (which then ends the loop).
        for req in running:
            if budget <= 0:
                break
            start = req.num_computed_tokens
            num_outputs = len(req.output_token_ids) + req.num_pending
            if req.prefix_len is None:
                target = req.num_prompt_tokens + num_outputs
                n = target - start
                if n == 1 and num_outputs < req.max_output_tokens:
                    # A decode step, the grant of almost every row (one token, which samples):
                    # _grant's work, inline. Its token goes to the page of the token before it
                    # (computed, so held: nothing to allocate) but at a page boundary.
                    added = allocate(req.request_id, start + 1) if start % page_size == 0 else no_pages
                    if added is not None:  # (None: out of pages: the general path below preempts)
                        if added is no_pages:
                            starts.append(start)  # grants.add's work, inline
                        else:
                            grants.add(start, 1, True, added)
                        req.num_computed_tokens = start + 1
                        req.num_pending += 1
                        if start + 1 >= req.cache_next:
                            to_cache[req] = None
                        scheduled.append(req)
                        budget -= 1
                        continue
            else:
                target = req.prefix_len
                n = target - start
            if n <= 0 or num_outputs >= req.max_output_tokens:
                continue  # waiting for its launched steps: a prefix about to fork, or a last token
            if n > budget:
                n = budget
            while (added := allocate(req.request_id, start + n)) is None:
                if self._evict_waiting_pages():
                    continue
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                grant(grants, req, n, added, start + n == target and req.prefix_len is None)
                scheduled.append(req)
                budget -= n
        # Admit new work only in a step that preempted nothing: pages are scarce otherwise.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            cached, entries = self._lookup(req)
            computed = req.num_computed_tokens + len(cached) * self.kv.page_size
            n = min(req.target_tokens - computed, budget)
            if self.kv.allocate(req.request_id, computed + n, cached) is None:
                break
            self.waiting.popleft()
            self._first_admission(req)
            if entries is not None:
                self._took_cached(req, computed, entries)
            if n == 0:  # a prefix request whose pages are all cached
                self._fork(req)
                continue
            self._admit(grants, req, n)
            scheduled.append(req)
            budget -= n
        return scheduled

    def _lookup(self, req: Request) -> tuple[list[int], list[int] | None]:
        """The cached pages a waiting request can start on, and their cache entries (None: it may
        not look: caching off, something computed already, penalties or prompt logprobs)."""
        params = req.sampling_params
        if (
            not self.kv.enable_caching
            or req.num_computed_tokens
            or params.has_penalties
            or params.prompt_logprobs is not None
        ):
            return [], None
        known = req.num_prompt_tokens + len(req.output_token_ids)
        # At least the last token is computed (its logits pick the next one); a prefix request
        # needs its shared pages only.
        limit = req.prefix_len if req.prefix_len is not None else known - 1
        tokens = req.prompt_token_ids + req.output_token_ids if req.output_token_ids else req.prompt_token_ids
        return self.kv.lookup(tokens, limit // self.kv.page_size, params.cache_salt)

    def _took_cached(self, req: Request, computed: int, entries: list[int]) -> None:
        """A request admitted on cached pages (or none found): counted, its chain started."""
        req.num_computed_tokens = computed
        self._chain(req, entries)
        self.prefix_cache.queries += req.num_prompt_tokens + len(req.output_token_ids)
        self.prefix_cache.hits += computed
        if req.num_cached_tokens < 0:  # its first admission: what the user is told
            req.num_cached_tokens = computed
            self._new_cached[req.family_id] = computed

    def _first_admission(self, req: Request) -> None:
        """Stamps a request's first admission (a resumed one keeps its first): per request, not
        per step. Its family's stamp is its first member's."""
        if req.scheduled_at is None:
            req.scheduled_at = now = time.perf_counter()
            self._new_scheduled.setdefault(req.family_id, now)

    def _chain(self, req: Request, entries: list[int]) -> None:
        """Sets the request's chain of cache entries (its first pages)."""
        req.cache_entries = entries
        req.cache_next = (len(entries) + 1) * self.kv.page_size if self.kv.enable_caching else NEVER

    def _cache_pages(self, req: Request) -> bool:
        """Caches the request's full pages whose tokens are all computed (by steps scheduled)
        and known (a decode input still on the device is cached a step later); returns whether
        every computed full page is cached now."""
        if not self.kv.enable_caching:
            return True
        size, entries = self.kv.page_size, req.cache_entries
        computed = req.num_computed_tokens // size * size
        done = min(computed, (req.num_prompt_tokens + len(req.output_token_ids)) // size * size)
        if done > len(entries) * size:
            tokens = req.token_ids(len(entries) * size, done)
            self.kv.cache_pages(req.request_id, entries, tokens, req.sampling_params.cache_salt)
            req.cache_next = (len(entries) + 1) * size
        return done == computed

    def take_num_cached_tokens(self) -> dict[str, int]:
        """Family id -> prompt tokens found in the prefix cache, for the families admitted for the
        first time since the last call."""
        taken, self._new_cached = self._new_cached, {}
        return taken

    def take_scheduled(self) -> dict[str, float]:
        """Family id -> when it was first admitted (time.perf_counter), for the families whose
        first member was admitted since the last call (a later sibling may name its family again)."""
        taken, self._new_scheduled = self._new_scheduled, {}
        return taken

    def reset_prefix_cache(self) -> int:
        """Forgets every cached page no request holds; returns how many."""
        return self.kv.reset_cache()

    def _schedule_quarantined(self, grants: _Grants) -> list[Request]:
        """One suspected request, alone in the step, so that a failure names it."""
        req = next((r for r in [*self.running, *self.waiting] if r.request_id in self._quarantine), None)
        if req is None:  # the suspects finished or were aborted
            self._quarantine.clear()
            return self._schedule(grants)
        while req not in self.running and len(self.running) >= self.config.max_num_seqs:  # room for it
            self._preempt(self.running.pop())
        while True:
            n = min(req.target_tokens - req.num_computed_tokens, self.config.max_num_batched_tokens)
            if (added := self.kv.allocate(req.request_id, req.num_computed_tokens + n)) is not None:
                break
            if self._evict_waiting_pages(keep=req):  # forked children waiting pin pages too
                continue
            victim = next((r for r in reversed(self.running) if r is not req), None)
            if victim is None:
                raise RuntimeError(f"request {req.request_id!r} alone does not fit the KV cache")
            self.running.remove(victim)
            self._preempt(victim)
        if req in self.waiting:
            self.waiting.remove(req)
            self._first_admission(req)
            self._admit(grants, req, n)
        else:
            self._grant(grants, req, n, added, self._ends_at_last_token(req, n))
        return [req]

    @staticmethod
    def _ends_at_last_token(req: Request, n: int) -> bool:
        """Whether a grant of n tokens reaches the request's last token, so that it samples."""
        return req.prefix_len is None and req.num_computed_tokens + n == req.num_tokens

    def _admit(self, grants: _Grants, req: Request, n: int) -> None:
        """A waiting request starts running: the runner gets it in full."""
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        grants.new.append(
            NewRequestData(
                req.request_id,
                req.prompt_token_ids + req.output_token_ids,
                req.num_prompt_tokens,
                req.sampling_params,
                req.seed,
                list(self.kv.table(req.request_id)),
            )
        )
        self._grant(grants, req, n, [], self._ends_at_last_token(req, n))

    def _grant(self, grants: _Grants, req: Request, n: int, new_pages: Sequence[int], samples: bool) -> None:
        """samples: the grant ends at the request's last token (its logits pick the next one).
        _schedule records a running request's decode grant inline, as this does: keep them alike."""
        start = req.num_computed_tokens
        end = start + n
        grants.add(start, n, samples, new_pages)
        req.num_computed_tokens = end
        req.num_pending += samples
        if end >= req.cache_next:  # a page full of computed tokens, to cache
            self._to_cache[req] = None

    def forget_issued(self) -> None:
        """The outputs scheduled but not updated will never be: no step is in flight any more."""
        self._issued.clear()

    def retry(self, requests: list[str]) -> None:
        """After a failed step (and with no other step in flight): these requests lose their pages
        and pending tokens and wait to be recomputed (a waiting one, e.g. an n > 1 child that
        forked onto shared pages, starts over too). Their families run alone until a step of
        theirs succeeds. The prefix cache forgets every page: the failed step's may hold garbage."""
        self.forget_issued()
        for req in [self.requests[r] for r in requests if r in self.requests]:
            req.num_pending = 0
            if req.status is RequestStatus.RUNNING:
                self.running.remove(req)
                self._preempt(req)
            elif not req.status.finished:
                self._drop_pages(req)
        self.kv.reset_cache(referenced_too=True)

    def quarantine(self, output: SchedulerOutput, spare: set[str] = frozenset()) -> None:
        """After `output` failed: each of its live requests (but those of the families in spare)
        runs alone until a step of it gets as far as its failed grant did."""
        for rid, start, n in zip(output.request_ids, output.num_computed_tokens, output.num_scheduled_tokens):
            req = self.requests.get(rid)
            if req is not None and req.family_id not in spare:
                self._quarantine[rid] = max(self._quarantine.get(rid, 0), start + n)

    def is_quarantined(self, request_id: str) -> bool:
        return request_id in self._quarantine

    @property
    def has_quarantine(self) -> bool:
        return bool(self._quarantine)

    def _evict_waiting_pages(self, keep: Request | None = None) -> bool:
        """Drops the page table of the newest waiting request that holds pages (an n > 1 child
        that forked onto the prompt's shared pages and has not run yet; not `keep`): it will
        compute its prompt itself. Pages held by requests that cannot run would otherwise starve
        running ones. Returns whether a request gave its pages up (a page shared with a sibling
        is free only once all have)."""
        for req in reversed(self.waiting):
            if req is not keep and self.kv.table(req.request_id):
                self._drop_pages(req)
                return True
        return False

    def _drop_pages(self, req: Request) -> None:
        """Frees the request's pages (caching its full ones first): it recomputes from its first
        token, or from what it finds in the prefix cache."""
        self._cache_pages(req)
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        self._chain(req, [])

    def _preempt(self, req: Request) -> None:
        self._drop_pages(req)
        self._removed.append(req.request_id)  # the runner frees its row; it comes back as new
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update(self, output: SchedulerOutput, tokens: list[int]) -> UpdateResult:
        """Applies a step's sampled tokens (tokens[i]: what grant i sampled; ignored where it does
        not sample). Steps are updated in the order they were scheduled. Returns which grants'
        requests got their token and which of those finished (their pages are already freed)."""
        issued, requests = self._issued.popleft()
        if issued is not output:
            raise RuntimeError("scheduler outputs must be updated in the order they were scheduled")
        advanced, finished, gone = [], {}, set()
        quarantine, samples = self._quarantine, output.samples
        for i, req in enumerate(requests):
            if quarantine and req.request_id in quarantine:  # cleared once it got past its failure
                if output.num_computed_tokens[i] + output.num_scheduled_tokens[i] >= quarantine[req.request_id]:
                    del quarantine[req.request_id]
            # aborted or finished meanwhile: its token is dropped (a running one is not: decided
            # by identity, as hashing an enum member is a Python call)
            if req.status is not RUNNING and req.status in FINISHED:
                gone.add(req.request_id)
                continue
            if not samples[i]:  # a prefill chunk, or a prefix request's (which never samples)
                if req.prefix_len is not None:
                    # Fork once the grant that completes the prompt's shared pages has run (its
                    # computed count got there when it was scheduled, possibly a step earlier).
                    end = output.num_computed_tokens[i] + output.num_scheduled_tokens[i]
                    if req.status is RequestStatus.RUNNING and end == req.prefix_len:
                        self._fork(req)
                continue
            # A request preempted since keeps its token: it is recomputed with it.
            req.num_pending -= 1
            token = tokens[i]
            outputs = req.output_token_ids
            outputs.append(token)
            advanced.append(i)
            # The common case (no stop id, short of its length) is decided here, without a call.
            if (token in req.may_stop_on or len(outputs) >= req.max_output_tokens) and self._check_stop(req, token):
                finished[req.request_id] = (req.status.value, req.stop_reason)
        return UpdateResult(advanced, finished, gone)

    def _check_stop(self, req: Request, token: int) -> bool:
        """Finishes the request if its new token ends it (eos, a stop token id, its length)."""
        n_out = len(req.output_token_ids)
        params = req.sampling_params
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token in req.eos_token_ids:
                self.finish(req.request_id, RequestStatus.FINISHED_STOPPED)
                return True
            if token in params.stop_token_ids:
                self.finish(req.request_id, RequestStatus.FINISHED_STOPPED, stop_reason=token)
                return True
        if n_out >= req.max_output_tokens:
            self.finish(req.request_id, RequestStatus.FINISHED_LENGTH)
            return True
        return False

    def _fork(self, prefix: Request) -> None:
        children = self._forks.pop(prefix.request_id)
        num_pages = prefix.prefix_len // self.kv.page_size
        for child in reversed(children):  # at the head of the queue, in index order
            self.kv.share(child.request_id, prefix.request_id, num_pages)
            child.num_computed_tokens = prefix.prefix_len
            child.num_cached_tokens = prefix.num_cached_tokens  # the family's, told already
            child.scheduled_at = prefix.scheduled_at  # the family's, told already
            self._chain(child, prefix.cache_entries[:num_pages])
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

    def abort(self, family_id: str) -> list[str]:
        """Aborts a request and everything made from it (n > 1 children, prefix); returns the ids
        of those that sample."""
        members = [r for r in self.requests.values() if r.family_id == family_id]
        for req in members:
            self._forks.pop(req.request_id, None)
            req.status = RequestStatus.FINISHED_ABORTED
            self._remove(req)
        return [r.request_id for r in members if r.prefix_len is None]

    def _remove(self, req: Request) -> None:
        self._removed.append(req.request_id)
        if not req.status.finished:  # a prefix request, done once its children forked
            req.status = RequestStatus.FINISHED_STOPPED
        self._cache_pages(req)  # its last pages, completed by tokens known since its last grant
        self.kv.free(req.request_id)
        self.requests.pop(req.request_id, None)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def family_ids(self, request_ids: list[str]) -> list[str]:
        """The families of the live requests among these ids, each once, in order."""
        return list(dict.fromkeys(self.requests[r].family_id for r in request_ids if r in self.requests))

    def has_family(self, family_id: str) -> bool:
        return any(r.family_id == family_id for r in self.requests.values())

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def has_undelivered_removals(self) -> bool:
        """Removed requests whose rows the runner has not been told to free yet."""
        return bool(self._removed)
