"""Request slots: the device rows a request owns while it runs.

A request takes a slot the first time it is scheduled and gives it back when it finishes, is
preempted or is aborted. The slot indexes its row of the device page table and of the penalty
statistics. `synced` counts the pages of its row already written on the device, so that each
step sends only the pages allocated since.
"""

from __future__ import annotations


class RequestSlots:
    def __init__(self, num_slots: int):
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.of: dict[str, int] = {}
        self.synced: dict[str, int] = {}

    def acquire(self, request_id: str) -> tuple[int, int]:
        """The request's slot (taking a free one if it has none) and its pages on the device."""
        slot = self.of.get(request_id)
        if slot is None:
            if not self._free:
                raise RuntimeError("no free request slot: more running requests than max_num_seqs")
            slot = self.of[request_id] = self._free.pop()
            self.synced[request_id] = 0
        return slot, self.synced[request_id]

    def release(self, request_id: str) -> None:
        slot = self.of.pop(request_id, None)
        if slot is not None:
            self.synced.pop(request_id)
            self._free.append(slot)

    @property
    def num_free(self) -> int:
        return len(self._free)
