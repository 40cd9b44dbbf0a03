"""The scheduler: pure Python, no JAX. Requests in, token grants out, pages accounted.

    add_request -> waiting queue -> schedule() -> SchedulerOutput (plain data, one way to the
    runner: removed ids, new requests in full, each grant's q_len/start/new pages) -> [the engine
    runs the step] -> update(step, sampled tokens) -> UpdateResult (who advanced, who finished);
    finished requests free their pages at once and reach the runner in the next SchedulerOutput

`KVPageManager` owns the free pages, each request's page table and the prefix cache (full pages
found again by their tokens); `Scheduler` decides who runs, starting a request past the pages it
finds cached, chunking prefills to the token budget and preempting (recompute) when pages run out.
"""

from jaxserve.scheduler.kv_pages import KVPageManager
from jaxserve.scheduler.output import NewRequestData, SchedulerOutput, UpdateResult
from jaxserve.scheduler.request import Request, RequestStatus, sample_ids
from jaxserve.scheduler.scheduler import Scheduler, SchedulerConfig

__all__ = [
    "KVPageManager",
    "NewRequestData",
    "Request",
    "RequestStatus",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "UpdateResult",
    "sample_ids",
]
