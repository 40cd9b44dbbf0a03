"""The KV page manager: pages, each request's page table, and the prefix cache. Pure Python.

    free         [p7, p2, p9, ...]          pages holding nothing of value: handed out first
    evictable    p3 -> p8 -> p5 (LRU order)  unreferenced pages that keep cached contents: handed
                                             out (their cache entries forgotten) only when `free`
                                             is empty; a cache hit takes one back from the middle
    tables       req -> [p0, p4, p1]         allocate(req, tokens) grows req's table to
                                             ceil(tokens / page_size) pages, all or nothing
    refcounts    page -> holders             n > 1 children and cache hits share pages
    cached       key -> page                 full pages of computed tokens, found by their key

A cache key names a full page by what decides its KV: the tokens before it and its own tokens.

    key(page i) = (entry of page i-1  | the request's cache_salt for page 0,  its page_size token ids)

`entry` is a number given to each key when it is first cached and never reused, so that a key
chains exactly: a lookup that matches page i matched every token of pages 0..i (dict lookups
compare the token tuples themselves: no hash collision can alias two prefixes), and pages cached
under an entry that was evicted become unreachable. The model is implicit (one cache per engine).

A request's page is cached once every token in it is computed (the scheduler calls cache_pages;
tokens of a step already scheduled count as computed: steps run in order on the device, and a
later hit is scheduled after them). A cached page is full, so nobody writes to it again; a page
being written is never cached. When its last holder frees it, a cached page goes to the end of
the eviction order (a table's last pages first, so that a request's prefix outlives its tail).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

NO_PAGES: tuple[int, ...] = ()  # what allocate() returns when nothing was added


class KVPageManager:
    def __init__(self, num_pages: int, page_size: int, enable_caching: bool = True):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need at least one page of at least one token, got {num_pages} x {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_caching = enable_caching
        self._free: deque[int] = deque(range(num_pages))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._refs = [0] * num_pages
        self._tables: dict[str, list[int]] = {}
        self._cached: dict[tuple, int] = {}  # key -> page
        self._key_of: list[tuple | None] = [None] * num_pages
        self._entry_of = [-1] * num_pages
        self._next_entry = 0
        self.num_evictions = 0

    @property
    def num_free_pages(self) -> int:
        """Pages a request can be given: free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_pages(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_pages / self.num_pages

    def table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    # -- pages -------------------------------------------------------------------------------
    def allocate(self, request_id: str, num_tokens: int, cached: Sequence[int] = ()) -> Sequence[int] | None:
        """Grows the request's pages to hold num_tokens; returns the pages added (often none), or
        None (and nothing taken) if too few are free. `cached`: pages a lookup found, taken first
        (for a request that holds no pages yet)."""
        table = self._tables.get(request_id)
        missing = -(-num_tokens // self.page_size) - (len(cached) if table is None else len(table))
        if missing <= 0 and not cached:  # the common case, a decode step inside its last page
            return NO_PAGES
        if table is None:
            table = self._tables[request_id] = []
        elif cached:
            raise ValueError(f"request {request_id!r} already holds pages")
        missing = max(missing, 0)
        free, refs = self._free, self._refs
        # Evictable pages a hit takes back (no generator for a request growing its own table).
        reclaimed = sum(refs[p] == 0 for p in cached) if cached else 0
        if missing > len(free) + len(self._evictable) - reclaimed:  # num_free_pages, without the call
            if not table:
                del self._tables[request_id]
            return None
        for page in cached:
            if refs[page] == 0:
                del self._evictable[page]
            refs[page] += 1
        table += cached
        if missing <= len(free):
            added = [free.popleft() for _ in range(missing)]
        else:
            added = [free.popleft() if free else self._evict() for _ in range(missing)]
        for page in added:
            refs[page] = 1
        table += added
        return added

    def _evict(self) -> int:
        page, _ = self._evictable.popitem(last=False)
        del self._cached[self._key_of[page]]
        self._key_of[page] = None
        self.num_evictions += 1
        return page

    def share(self, request_id: str, source_id: str, num_pages: int) -> None:
        """Starts request_id's table with the first num_pages pages of source_id's."""
        if request_id in self._tables:
            raise ValueError(f"request {request_id!r} already holds pages")
        shared = self._tables[source_id][:num_pages]
        for page in shared:
            self._refs[page] += 1
        self._tables[request_id] = list(shared)

    def free(self, request_id: str) -> None:
        """Drops the request's pages; a page nobody holds any more becomes free, or evictable if
        it is cached (last pages first in the eviction order)."""
        table = self._tables.pop(request_id, None)
        if not table:
            return
        refs, key_of = self._refs, self._key_of
        for page in reversed(table):
            refs[page] -= 1
            if refs[page] == 0:
                if key_of[page] is None:
                    self._free.append(page)
                else:
                    self._evictable[page] = None

    # -- the prefix cache ----------------------------------------------------------------------
    def lookup(self, token_ids: Sequence[int], num_pages: int, salt: str | None = None) -> tuple[list[int], list[int]]:
        """The longest run of cached pages holding token_ids' first num_pages pages: (pages,
        their entries). Changes nothing."""
        pages, entries = [], []
        if not self.enable_caching:
            return pages, entries
        size, cached, parent = self.page_size, self._cached, salt
        for i in range(num_pages):
            page = cached.get((parent, tuple(token_ids[i * size : (i + 1) * size])))
            if page is None:
                break
            parent = self._entry_of[page]
            pages.append(page)
            entries.append(parent)
        return pages, entries

    def cache_pages(self, request_id: str, entries: list[int], token_ids: Sequence[int], salt: str | None) -> None:
        """Caches the request's pages from page len(entries) on, whose tokens (token_ids, whole
        pages from that page's first token) are all computed; `entries` is the request's chain of
        entries so far, extended here. A page whose key is cached already (another request
        computed the same tokens) stays uncached; the chain goes on from the cached entry."""
        size, table, first = self.page_size, self._tables.get(request_id, ()), len(entries)
        for j in range(min(len(token_ids) // size, len(table) - first)):
            key = (entries[-1] if entries else salt, tuple(token_ids[j * size : (j + 1) * size]))
            page = self._cached.get(key)
            if page is None:
                page = table[first + j]
                if self._key_of[page] is not None:  # cannot happen: a page is cached once, when full
                    raise RuntimeError(f"page {page} is cached already")
                self._cached[key] = page
                self._key_of[page] = key
                self._entry_of[page] = self._next_entry
                self._next_entry += 1
            entries.append(self._entry_of[page])

    def reset_cache(self, *, referenced_too: bool = False) -> int:
        """Forgets cached pages: the unreferenced ones (they become plain free pages), and with
        referenced_too the ones requests hold as well (after a failure: their contents may be
        lost). Returns how many were forgotten."""
        forgotten = len(self._evictable)
        for page in self._evictable:
            del self._cached[self._key_of[page]]
            self._key_of[page] = None
            self._free.append(page)
        self._evictable.clear()
        if referenced_too:
            for page in self._cached.values():
                self._key_of[page] = None
            forgotten += len(self._cached)
            self._cached.clear()
        return forgotten
