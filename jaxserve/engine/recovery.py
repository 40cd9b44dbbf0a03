"""A failed step: retry its requests alone, fail only the one that fails again.

    step raised -> a request already under quarantine (it ran alone): its family failed, aborted
                -> the rest of the step (and the step launched behind it) recomputed; each of
                   its requests quarantined: it runs alone until a step of it gets as far as
                   the failed grant did (a failure late in a request is found too)
                -> if the device ran it (its cache and state derive from the failure) or the
                   donated cache is gone: fresh device state, every live request recomputed

The engine core calls recover() and raises StepFailed with the failed family ids; callers
(LLMEngine, AsyncLLM) fail those requests and serve on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax

from jaxserve.scheduler.output import SchedulerOutput

if TYPE_CHECKING:
    from jaxserve.engine.core import EngineCore


class StepFailed(RuntimeError):
    """A step raised. `failed` holds the request ids given up on (each failed again while running
    alone); every other request of that step is recomputed, its family first tried alone."""

    def __init__(self, failed: list[str], cause: BaseException):
        super().__init__(f"step failed ({type(cause).__name__}: {cause}); failed requests: {failed}")
        self.failed = failed
        self.cause = cause


def recover(core: EngineCore, step: SchedulerOutput, error: BaseException, *, launched: bool) -> list[str]:
    """After `step` raised: returns the family ids failed for good. launched: the device ran it
    (and the step launched behind it read its cache)."""
    scheduler, runner = core.scheduler, core.runner
    core.forget_timing()
    # A suspect runs alone: if it fails again, its family is failed for good.
    failed = scheduler.family_ids([r for r in step.request_ids if scheduler.is_quarantined(r)])
    for family_id in failed:
        scheduler.abort(family_id)
    # Donated buffers a failed program consumed (the sampler and the page-table writer donate the
    # device state alone) leave nothing to run on: rebuild.
    if launched or any(leaf.is_deleted() for leaf in jax.tree.leaves((runner.kv_cache, runner.device_state))):
        runner.reset_device_state()
        victims = list(scheduler.requests)  # forked children waiting hold pages too
    else:
        victims = list(dict.fromkeys(step.request_ids))
    scheduler.retry(victims)
    scheduler.quarantine(step, spare=set(failed))
    core.log(f"step failed ({type(error).__name__}: {error}); failed {failed}, retrying {len(victims)} requests")
    return failed


def fail_all(core: EngineCore, error: BaseException) -> list[str]:
    """Aborts every request and rebuilds the device state; returns the aborted family ids."""
    scheduler = core.scheduler
    families = scheduler.family_ids(list(scheduler.requests))
    for family_id in families:
        scheduler.abort(family_id)
    scheduler.forget_issued()  # no step is in flight any more
    core.runner.reset_device_state()
    core.forget_timing()
    core.log(f"step failed ({type(error).__name__}: {error}); aborted {len(families)} requests")
    return families
