"""The executor lifecycle state machine and the nesting marks."""

from __future__ import annotations

import threading

import pytest

from engine import ExecutorStateError, ParallelConfig, ParallelExecutor
from engine._state import ExecutorState, Lifecycle, is_nested, worker_scope

ALLOWED = {
    (ExecutorState.CREATED, ExecutorState.RUNNING),
    (ExecutorState.CREATED, ExecutorState.SHUT_DOWN),
    (ExecutorState.RUNNING, ExecutorState.BROKEN),
    (ExecutorState.RUNNING, ExecutorState.SHUT_DOWN),
    (ExecutorState.BROKEN, ExecutorState.SHUT_DOWN),
}


def _lifecycle_at(state: ExecutorState) -> Lifecycle:
    path = {
        ExecutorState.CREATED: [],
        ExecutorState.RUNNING: [ExecutorState.RUNNING],
        ExecutorState.BROKEN: [ExecutorState.RUNNING, ExecutorState.BROKEN],
        ExecutorState.SHUT_DOWN: [ExecutorState.SHUT_DOWN],
    }[state]
    lifecycle = Lifecycle()
    for step in path:
        lifecycle.move(step)
    return lifecycle


@pytest.mark.parametrize("source", list(ExecutorState))
@pytest.mark.parametrize("target", list(ExecutorState))
def test_transition_table(source: ExecutorState, target: ExecutorState) -> None:
    lifecycle = _lifecycle_at(source)
    if (source, target) in ALLOWED:
        assert lifecycle.move(target) is source
        assert lifecycle.state is target
    else:
        with pytest.raises(ExecutorStateError, match=source.value):
            lifecycle.move(target)
        assert lifecycle.state is source


def test_transitions_are_atomic_under_threads() -> None:
    lifecycle = Lifecycle()
    lifecycle.move(ExecutorState.RUNNING)
    wins = []
    barrier = threading.Barrier(8)

    def attempt() -> None:
        barrier.wait()
        try:
            lifecycle.move(ExecutorState.SHUT_DOWN)
            wins.append(1)
        except ExecutorStateError:
            pass

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(wins) == 1


def test_broken_reason_in_message() -> None:
    lifecycle = Lifecycle()
    lifecycle.move(ExecutorState.RUNNING)
    lifecycle.move(ExecutorState.BROKEN, reason="supervisor died")
    with pytest.raises(ExecutorStateError, match="supervisor died"):
        lifecycle.require_running("map")


def test_map_before_enter() -> None:
    ex = ParallelExecutor(ParallelConfig(strategy="serial"))
    with pytest.raises(ExecutorStateError, match="enter it first"):
        ex.map(abs, [1])


def test_map_after_shutdown() -> None:
    with ParallelExecutor(ParallelConfig(strategy="serial")) as ex:
        pass
    assert ex.state is ExecutorState.SHUT_DOWN
    with pytest.raises(ExecutorStateError, match="shut_down"):
        ex.map(abs, [1])
    with pytest.raises(ExecutorStateError):
        ex.share([1])


def test_reenter_is_refused() -> None:
    ex = ParallelExecutor(ParallelConfig(strategy="serial"))
    with ex, pytest.raises(ExecutorStateError, match="entered once"):
        ex.__enter__()
    with pytest.raises(ExecutorStateError):
        ex.__enter__()


def test_shutdown_is_idempotent() -> None:
    ex = ParallelExecutor(ParallelConfig(strategy="serial"))
    ex.shutdown()
    ex.shutdown()
    assert ex.state is ExecutorState.SHUT_DOWN


def test_worker_scope_nests_and_unwinds() -> None:
    assert not is_nested()
    with worker_scope():
        assert is_nested()
        with worker_scope():
            assert is_nested()
        assert is_nested()
    assert not is_nested()


def test_worker_scope_is_per_thread() -> None:
    seen = []
    with worker_scope():
        thread = threading.Thread(target=lambda: seen.append(is_nested()))
        thread.start()
        thread.join()
    assert seen == [False]
