"""The crash matrix (loky style): a table of faults, each provoked for real.

Every row runs under fork and spawn: the map raises the expected error, and
the same executor then maps correctly (FAULTS.md #1-#6). Crashes are real:
a NULL dereference (SIGSEGV), ``os._exit``, ``os.kill(getpid(), SIGKILL)``,
at each moment of a task's trip (pickled in the caller, unpickled in a worker,
returned, unpickled back).
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from typing import Any

import pytest
from _crash_tasks import (
    CrashAtUnpickle,
    ErrorAtPickle,
    ErrorAtUnpickle,
    ExitAtUnpickle,
    exit_on,
    identity,
    ignore_arg,
    raise_on,
    return_instance,
    return_lock,
    segfault_on,
    sigkill_on,
    start_methods,
)

from engine import ParallelConfig, ParallelExecutor, WorkerCrashedError

pytestmark = pytest.mark.spawn

ITEMS = list(range(8))


def _items_with(bad: Any) -> list[Any]:
    return [0, 1, 2, bad, 4, 5]


# id -> (fn, items, extra args, expected error, message regex, crashed chunk or None)
CRASH_CASES: dict[
    str, tuple[Any, Any, tuple[Any, ...], type[BaseException], str, int | None]
] = {
    "fn segfaults": (segfault_on, ITEMS, (), WorkerCrashedError, "SIGSEGV", 3),
    "fn calls os._exit": (exit_on, ITEMS, (), WorkerCrashedError, "exit code 7", 3),
    "fn SIGKILLs itself": (sigkill_on, ITEMS, (), WorkerCrashedError, "SIGKILL", 3),
    "fn raises": (raise_on, ITEMS, (), KeyError, "task 3 failed on purpose", None),
    "item segfaults at unpickle": (
        identity,
        _items_with(CrashAtUnpickle()),
        (),
        WorkerCrashedError,
        "SIGSEGV",
        3,
    ),
    "item exits at unpickle": (
        identity,
        _items_with(ExitAtUnpickle()),
        (),
        WorkerCrashedError,
        "exit code 9",
        3,
    ),
    "item raises at unpickle": (
        identity,
        _items_with(ErrorAtUnpickle()),
        (),
        ValueError,
        "cannot unpickle",
        None,
    ),
    "item raises at pickle": (
        identity,
        _items_with(ErrorAtPickle()),
        (),
        pickle.PicklingError,
        "item 3",
        None,
    ),
    "result exits at pickle": (
        return_instance,
        ITEMS,
        ("ExitAtPickle",),
        WorkerCrashedError,
        "exit code 8",
        3,
    ),
    "result raises at pickle": (
        return_instance,
        ITEMS,
        ("ErrorAtPickle",),
        pickle.PicklingError,
        "item 3",
        None,
    ),
    "result is a lock": (return_lock, ITEMS, (), pickle.PicklingError, "item 3", None),
    "result fails to unpickle in the caller": (
        return_instance,
        ITEMS,
        ("ErrorInCaller",),
        pickle.UnpicklingError,
        "item 3",
        None,
    ),
    "argument is a lock": (
        ignore_arg,
        ITEMS,
        (threading.Lock(),),
        pickle.PicklingError,
        "extra argument 0",
        None,
    ),
    "argument raises at unpickle": (
        ignore_arg,
        ITEMS,
        (ErrorAtUnpickle(),),
        ValueError,
        "cannot unpickle",
        None,
    ),
    "argument exits at unpickle": (
        ignore_arg,
        ITEMS,
        (ExitAtUnpickle(),),
        WorkerCrashedError,
        "exit code 9",
        None,
    ),
}


@pytest.mark.parametrize("start_method", start_methods())
@pytest.mark.parametrize("case", list(CRASH_CASES))
def test_crash_case(case: str, start_method: str) -> None:
    fn, items, extra, expected, match, crashed_chunk = CRASH_CASES[case]
    if os.name != "posix" and match.startswith("SIG"):
        pytest.skip("Windows reports crashes as exit codes, and has no SIGKILL")
    config = ParallelConfig(
        strategy="processes", max_workers=2, start_method=start_method, min_batch_size=1
    )
    with ParallelExecutor(config) as ex:
        started = time.monotonic()
        with pytest.raises(expected, match=match) as caught:
            ex.map(fn, items, *extra, chunk_size=1)
        # FAULTS.md #1: the error arrives within 1 s of the fault (the fault
        # happens at once here); generous for a loaded machine.
        assert time.monotonic() - started < 3.0
        error = caught.value
        if isinstance(error, WorkerCrashedError):
            assert error.pid is not None
            assert error.exitcode is not None or error.signal_name is not None
            if crashed_chunk is not None:
                assert error.chunk_index == crashed_chunk
        elif expected not in (pickle.PicklingError,) or "extra argument" not in match:
            # an error raised in a worker carries the remote traceback
            assert error.__cause__ is not None
        # the same executor keeps working
        assert ex.map(identity, range(20), chunk_size=3) == list(range(20))


@pytest.mark.parametrize("start_method", start_methods())
def test_crash_with_force_serial_completes(start_method: str) -> None:
    from engine import FallbackWarning

    config = ParallelConfig(
        strategy="processes",
        max_workers=2,
        start_method=start_method,
        min_batch_size=1,
        force_serial_on_failure=True,
    )
    with (
        ParallelExecutor(config) as ex,
        pytest.warns(FallbackWarning, match="re-ran it"),
    ):
        # The crash happens only in a worker: in the caller the item is fine.
        out = ex.map(exit_on_in_worker, ITEMS, chunk_size=2)
    assert out == ITEMS
    run = ex.telemetry.summary()["runs"][-1]
    assert run["status"] == "ok"
    assert run["failures"] >= 1
    assert run["fallbacks"]
    assert "exit code" in run["fallbacks"][0]["reason"]


def exit_on_in_worker(x: int) -> int:
    """os._exit(5) on item 3, but only inside a worker process."""
    from engine import _state

    if x == 3 and _state._process_is_worker:  # a test helper reads the flag
        import os

        os._exit(5)
    return x


@pytest.mark.parametrize("start_method", start_methods())
@pytest.mark.parametrize("fn", [exit_on, segfault_on, sigkill_on])
def test_crash_inside_a_pack_is_pinned_on_its_chunk(fn: Any, start_method: str) -> None:
    # Tiny chunks travel in packs (one frame for many chunks); the progress
    # board still names the chunk that crashed.
    if os.name != "posix" and fn is not exit_on:
        pytest.skip("Windows: no signals")
    config = ParallelConfig(
        strategy="processes", max_workers=2, start_method=start_method, min_batch_size=1
    )
    target = 3000
    with ParallelExecutor(config) as ex:
        assert ex.map(identity, range(4000), chunk_size=1) == list(range(4000))
        with pytest.raises(WorkerCrashedError) as caught:
            ex.map(fn, range(4000), target, chunk_size=1)
        assert caught.value.chunk_index == target
        assert ex.map(identity, range(500), chunk_size=1) == list(range(500))


@pytest.mark.parametrize("start_method", start_methods())
def test_crash_inside_a_pack_reruns_serially(start_method: str) -> None:
    from engine import FallbackWarning

    config = ParallelConfig(
        strategy="processes",
        max_workers=2,
        start_method=start_method,
        min_batch_size=1,
        force_serial_on_failure=True,
    )
    with (
        ParallelExecutor(config) as ex,
        pytest.warns(FallbackWarning, match="chunk 3000"),
    ):
        # the other chunks of the lost pack are sent again, one by one
        out = ex.map(exit_on_in_worker_at, range(4000), 3000, chunk_size=1)
    assert out == list(range(4000))
    assert ex.telemetry.summary()["runs"][-1]["failures"] == 1


def exit_on_in_worker_at(x: int, target: int) -> int:
    """os._exit(5) on ``target``, only inside a worker process."""
    from engine import _state

    if x == target and _state._process_is_worker:
        os._exit(5)
    return x
