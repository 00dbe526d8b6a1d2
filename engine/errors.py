"""The exception and warning hierarchy of the engine (DESIGN.md section 5).

Whose fault it is decides the base: the caller's misuse is an
``ExecutorStateError``; an outside failure (a worker died, the supervisor
vanished) is a ``BrokenExecutorError``. Every class also inherits the builtin a
user already catches (``ValueError``, ``ImportError``, ``RuntimeError``).
"""

from __future__ import annotations

import concurrent.futures

__all__ = [
    "BrokenExecutorError",
    "CancelledError",
    "ConfigError",
    "EngineError",
    "EngineWarning",
    "ExecutorStateError",
    "FallbackWarning",
    "PayloadError",
    "RunTimeoutError",
    "StrategyUnavailableError",
    "SupervisorLostError",
    "WorkerCrashedError",
]


class EngineError(Exception):
    """Base class of every error the engine raises on its own behalf."""


class ConfigError(EngineError, ValueError):
    """A configuration field or ``CE_PARALLEL`` token is invalid."""


class StrategyUnavailableError(EngineError, ImportError):
    """A strategy's optional dependency is missing or cannot run here."""


class ExecutorStateError(EngineError, RuntimeError):
    """The executor was used in a state that does not allow the call."""


class CancelledError(EngineError, concurrent.futures.CancelledError):
    """The run was cancelled before all results were produced."""


# concurrent.futures.TimeoutError is the builtin TimeoutError from Python 3.11;
# on 3.10 they differ and a user may catch either.
_TIMEOUT_BASES: tuple[type[Exception], ...] = (
    (TimeoutError,)
    if concurrent.futures.TimeoutError is TimeoutError
    else (concurrent.futures.TimeoutError, TimeoutError)
)


class RunTimeoutError(EngineError, *_TIMEOUT_BASES):
    """The run exceeded ``ParallelConfig.timeout_s``."""


class PayloadError(EngineError):
    """A shared-memory payload could not be created, sized or attached."""


class BrokenExecutorError(EngineError, RuntimeError):
    """An external failure made the run (or the executor) fail."""


class WorkerCrashedError(BrokenExecutorError):
    """A worker process died while it held a chunk.

    Attributes
    ----------
    pid, exitcode, signal_name, chunk_index
        What is known of the dead worker and the chunk it held; ``None`` when
        unknown.
    """

    def __init__(
        self,
        msg: str,
        *,
        pid: int | None = None,
        exitcode: int | None = None,
        signal_name: str | None = None,
        chunk_index: int | None = None,
    ) -> None:
        super().__init__(msg)
        self.pid = pid
        self.exitcode = exitcode
        self.signal_name = signal_name
        self.chunk_index = chunk_index

    def __reduce__(self) -> tuple:
        return (
            _rebuild_worker_crashed,
            (str(self), self.pid, self.exitcode, self.signal_name, self.chunk_index),
        )


def _rebuild_worker_crashed(
    msg: str,
    pid: int | None,
    exitcode: int | None,
    signal_name: str | None,
    chunk_index: int | None,
) -> WorkerCrashedError:
    return WorkerCrashedError(
        msg,
        pid=pid,
        exitcode=exitcode,
        signal_name=signal_name,
        chunk_index=chunk_index,
    )


class SupervisorLostError(BrokenExecutorError):
    """The supervisor process died; the executor must be recreated."""


class EngineWarning(UserWarning):
    """Base class of the engine's warnings."""


class FallbackWarning(EngineWarning):
    """The engine ran something other than what was asked, and says why."""
