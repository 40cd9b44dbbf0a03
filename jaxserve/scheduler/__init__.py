"""The scheduler: pure Python, no JAX. Requests in, token grants out, pages accounted.

    add_request -> waiting queue -> schedule() -> SchedulerOutput (plain data, one way to the
    runner: removed ids, new requests in full, each grant's q_len/start/new pages) -> [the engine
    runs the step] -> update(step, sampled tokens) -> UpdateResult (who advanced, who finished);
    finished requests free their pages at once and reach the runner in the next SchedulerOutput

`KVPageManager` owns the page free list and each request's page table; `Scheduler` decides
who runs, chunking prefills to the token budget and preempting (recompute) when pages run out.
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
