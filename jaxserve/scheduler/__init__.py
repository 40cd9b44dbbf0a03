"""The scheduler: pure Python, no JAX. Requests in, token grants out, pages accounted.

    add_request -> waiting queue -> schedule() -> SchedulerOutput (chunks: request, start, q_len,
    pages) -> [the engine runs the step] -> update(sampled tokens) -> finished requests free pages

`KVPageManager` owns the page free list and each request's page table; `Scheduler` decides
who runs, chunking prefills to the token budget and preempting (recompute) when pages run out.
"""

from jaxserve.scheduler.kv_pages import KVPageManager
from jaxserve.scheduler.request import Request, RequestStatus
from jaxserve.scheduler.scheduler import ScheduledChunk, Scheduler, SchedulerConfig, SchedulerOutput

__all__ = [
    "KVPageManager",
    "Request",
    "RequestStatus",
    "ScheduledChunk",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
]
