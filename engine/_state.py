"""Executor lifecycle (an Enum + transition table behind one lock) and nesting.

::

    CREATED --enter--> RUNNING --shutdown--> SHUT_DOWN
       |                  |
       +----shutdown------+--broken--> BROKEN --shutdown--> SHUT_DOWN

The nesting marks say whether this thread or process is running work for an
executor; an executor created there runs serially (FAULTS.md #11).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from engine.errors import ExecutorStateError


class ExecutorState(enum.Enum):
    """Where an executor is in its life."""

    CREATED = "created"
    RUNNING = "running"
    BROKEN = "broken"
    SHUT_DOWN = "shut_down"


_TRANSITIONS: Final[dict[ExecutorState, frozenset[ExecutorState]]] = {
    ExecutorState.CREATED: frozenset({ExecutorState.RUNNING, ExecutorState.SHUT_DOWN}),
    ExecutorState.RUNNING: frozenset({ExecutorState.BROKEN, ExecutorState.SHUT_DOWN}),
    ExecutorState.BROKEN: frozenset({ExecutorState.SHUT_DOWN}),
    ExecutorState.SHUT_DOWN: frozenset(),
}

_REMEDY: Final[dict[ExecutorState, str]] = {
    ExecutorState.CREATED: "enter it first: `with ParallelExecutor(cfg) as ex: ...`",
    ExecutorState.RUNNING: "an executor is entered once; create a new one",
    ExecutorState.BROKEN: "create a new executor",
    ExecutorState.SHUT_DOWN: "create a new executor; a shut-down one cannot be reused",
}


class Lifecycle:
    """The state of one executor, changed only through the transition table."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = ExecutorState.CREATED
        self._broken_reason: str | None = None

    @property
    def state(self) -> ExecutorState:
        return self._state

    def move(
        self, target: ExecutorState, *, reason: str | None = None
    ) -> ExecutorState:
        """Move to ``target``; raise ``ExecutorStateError`` if not allowed.

        Returns the previous state.
        """
        with self._lock:
            current = self._state
            if target not in _TRANSITIONS[current]:
                msg = (
                    f"cannot move executor from {current.value} to {target.value}: "
                    f"{_REMEDY[current]}."
                )
                raise ExecutorStateError(msg)
            self._state = target
            if target is ExecutorState.BROKEN:
                self._broken_reason = reason
            return current

    def require_running(self, action: str) -> None:
        """Raise ``ExecutorStateError`` unless the executor is running."""
        state = self._state
        if state is ExecutorState.RUNNING:
            return
        detail = f" ({self._broken_reason})" if state is ExecutorState.BROKEN else ""
        msg = (
            f"cannot {action}: the executor is {state.value}{detail}; {_REMEDY[state]}."
        )
        raise ExecutorStateError(msg)


_local = threading.local()
_process_is_worker = False


def mark_worker_process() -> None:
    """Mark this whole process as an engine worker (called by the worker loop)."""
    global _process_is_worker
    _process_is_worker = True


@contextmanager
def worker_scope() -> Iterator[None]:
    """Mark the current thread as running work for an executor."""
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth = depth


def is_nested() -> bool:
    """Return True inside work run by an executor (thread or process)."""
    return _process_is_worker or getattr(_local, "depth", 0) > 0
