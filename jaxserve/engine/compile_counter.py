"""Counts XLA compilations in this process (jax.monitoring's backend-compile event), so the
engine can report, and tests assert, that serving compiles nothing after warm-up."""

from __future__ import annotations

import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_count = 0


def _listener(event: str, duration: float, **kwargs) -> None:
    global _count
    if event == _EVENT:
        with _lock:
            _count += 1


jax.monitoring.register_event_duration_secs_listener(_listener)


def compilations() -> int:
    return _count
