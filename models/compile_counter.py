"""Counts XLA backend compilations while active (``jax.monitoring``): the main job's
proof that its warm-up compiled every shape of its timed passes. An executable loaded
from the program cache (``jaxhicache.program_cache``) counts as one: the warm-up did
not have it either."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

from jaxhicache.program_cache import LOAD_EVENT

__all__ = ["CompileCounter"]

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_EVENTS = (_COMPILE_EVENT, LOAD_EVENT)


class CompileCounter:
    """Counts XLA backend compilations and program cache loads while active (``jax.monitoring``)."""

    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        self.names: list[str] = []
        self._on = False
        jax.monitoring.register_event_duration_secs_listener(self._event)

    def _event(self, event: str, duration: float, **kw) -> None:
        if self._on and event in _EVENTS:
            self.count += 1
            self.seconds += duration
            self.names.append(str(kw.get("fun_name", "?")))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self._on = True
        try:
            yield
        finally:
            self._on = False

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._event)
