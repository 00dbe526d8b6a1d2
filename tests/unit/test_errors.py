"""The error hierarchy: bases, builtins users already catch, pickling."""

from __future__ import annotations

import concurrent.futures
import pickle

import pytest

import engine
from engine import errors

HIERARCHY = [
    (errors.ConfigError, (errors.EngineError, ValueError)),
    (errors.StrategyUnavailableError, (errors.EngineError, ImportError)),
    (errors.ExecutorStateError, (errors.EngineError, RuntimeError)),
    (errors.CancelledError, (errors.EngineError, concurrent.futures.CancelledError)),
    (errors.RunTimeoutError, (errors.EngineError, TimeoutError)),
    (errors.PayloadError, (errors.EngineError,)),
    (errors.BrokenExecutorError, (errors.EngineError, RuntimeError)),
    (errors.WorkerCrashedError, (errors.BrokenExecutorError,)),
    (errors.SupervisorLostError, (errors.BrokenExecutorError,)),
    (errors.FallbackWarning, (errors.EngineWarning, UserWarning)),
]


@pytest.mark.parametrize(("cls", "bases"), HIERARCHY)
def test_hierarchy(cls: type, bases: tuple[type, ...]) -> None:
    for base in bases:
        assert issubclass(cls, base)


def test_every_error_is_exported() -> None:
    for name in errors.__all__:
        assert getattr(engine, name) is getattr(errors, name)


def test_worker_crashed_keeps_fields_through_pickle() -> None:
    error = errors.WorkerCrashedError(
        "worker died", pid=12, exitcode=-9, signal_name="SIGKILL", chunk_index=3
    )
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.pid, copy.exitcode, copy.signal_name, copy.chunk_index) == (
        12,
        -9,
        "SIGKILL",
        3,
    )
    assert str(copy) == "worker died"
