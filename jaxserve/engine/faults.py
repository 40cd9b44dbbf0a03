"""Test-only fault injection: makes the engine fail inside a step, on purpose.

Off unless an entry point is told so explicitly (`jaxserve serve --fault-token-id N`, or
JAXSERVE_FAULT_TOKEN_ID read by jaxserve.app). Then any step that starts a request whose prompt
contains token N raises, as a device error would: the step's requests are retried alone, the one
that fails again gets HTTP 500, and the engine serves on.
"""

from __future__ import annotations


class InjectedFault(RuntimeError):
    pass


def inject_step_failure(engine, token_id: int) -> None:
    """Through the runner's public fault hook: a step that starts a request whose prompt holds
    token_id raises (a request recomputed after a failure starts again, and fails again)."""

    def fail_on_token(output) -> None:
        if any(token_id in new.token_ids[: new.num_prompt_tokens] for new in output.new_requests):
            raise InjectedFault(f"injected failure: a scheduled prompt contains token {token_id}")

    engine.runner.fault_hook = fail_on_token
