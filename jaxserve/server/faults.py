"""Test-only fault injection: makes the engine fail inside a step, on purpose.

Off unless an entry point is told so explicitly (`jaxserve serve --fault-token-id N`, or
JAXSERVE_FAULT_TOKEN_ID read by jaxserve.app). Then any step that schedules a request whose prompt
contains token N raises, as a device error would: AsyncLLM fails that step's requests (HTTP 500)
and the engine serves on.
"""

from __future__ import annotations


class InjectedFault(RuntimeError):
    pass


def inject_step_failure(engine, token_id: int) -> None:
    dispatch = engine.runner.dispatch

    def failing_dispatch(sched):
        if any(token_id in chunk.request.prompt_token_ids for chunk in sched.chunks):
            raise InjectedFault(f"injected failure: a scheduled prompt contains token {token_id}")
        return dispatch(sched)

    engine.runner.dispatch = failing_dispatch
