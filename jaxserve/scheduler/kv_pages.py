"""The KV page manager: a free list of fixed-size pages and each request's page table.

    free list  [p7, p2, p9, ...]          allocate(req, tokens) grows req's table to
    tables     req -> [p0, p4, p1]        ceil(tokens / page_size) pages, all or nothing
    refcounts  page -> holders            share() lets n > 1 children hold a prompt's full pages

Pages return to the free list when their last holder frees them. Pure Python.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

NO_PAGES: tuple[int, ...] = ()  # what allocate() returns when nothing was added


class KVPageManager:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need at least one page of at least one token, got {num_pages} x {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: deque[int] = deque(range(num_pages))
        self._refs = [0] * num_pages
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_pages

    def table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def allocate(self, request_id: str, num_tokens: int) -> Sequence[int] | None:
        """Grows the request's pages to hold num_tokens; returns the pages added (often none), or
        None (and nothing taken) if too few are free."""
        table = self._tables.get(request_id)
        missing = -(-num_tokens // self.page_size) - (0 if table is None else len(table))
        if missing <= 0:  # the common case, a decode step inside its last page
            return NO_PAGES
        if table is None:
            table = self._tables[request_id] = []
        if missing > len(self._free):
            if not table:
                del self._tables[request_id]
            return None
        added = [self._free.popleft() for _ in range(missing)]
        for page in added:
            self._refs[page] = 1
        table += added
        return added

    def share(self, request_id: str, source_id: str, num_pages: int) -> None:
        """Starts request_id's table with the first num_pages pages of source_id's."""
        if request_id in self._tables:
            raise ValueError(f"request {request_id!r} already holds pages")
        shared = self._tables[source_id][:num_pages]
        for page in shared:
            self._refs[page] += 1
        self._tables[request_id] = list(shared)

    def free(self, request_id: str) -> None:
        for page in self._tables.pop(request_id, []):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free.append(page)
