"""Ctrl-C inside a strategy's step waits for a safe point (DeferInterrupt).

A KeyboardInterrupt raised inside a pool library's submit can leave a lock
held, after which shutting the pool down hangs; the strategies therefore
defer SIGINT around submits and waits and raise it where nothing is
half-done. These tests send real SIGINTs to this process.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from engine._chunks import make_chunks
from engine.strategies.base import (
    POLL_INTERVAL_S,
    DeferInterrupt,
    RunContext,
    run_windowed,
)
from engine.telemetry import Telemetry


@pytest.fixture
def default_sigint() -> Iterator[None]:
    """Python's own SIGINT handler, whatever the test runner installed."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_self() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # the handler runs at the next bytecode boundary


def _ctx() -> RunContext:
    recorder = Telemetry().recorder(strategy="threads", reason="test", workers=1)
    return RunContext(recorder, timeout_s=None, cancel_grace_s=1.0)


@pytest.mark.usefixtures("default_sigint")
def test_sigint_inside_the_block_is_raised_when_it_ends() -> None:
    reached_end: list[bool] = []

    def block() -> None:
        with DeferInterrupt() as interrupt:
            _interrupt_self()
            assert interrupt.caught
            reached_end.append(True)

    with pytest.raises(KeyboardInterrupt):
        block()
    assert reached_end == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.usefixtures("default_sigint")
def test_check_raises_at_the_safe_point_and_the_handler_is_restored() -> None:
    passed: list[str] = []

    def block() -> None:
        with DeferInterrupt() as interrupt:
            interrupt.check()  # nothing caught yet: no effect
            passed.append("first check")
            _interrupt_self()
            interrupt.check()
            passed.append("second check")

    with pytest.raises(KeyboardInterrupt):
        block()
    assert passed == ["first check"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.usefixtures("default_sigint")
def test_no_sigint_no_effect() -> None:
    with DeferInterrupt() as interrupt:
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    assert not interrupt.caught
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_handler_of_the_callers_own_is_left_alone() -> None:
    seen: list[int] = []

    def handler(signum: int, frame: object) -> None:
        seen.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        with DeferInterrupt() as interrupt:
            assert signal.getsignal(signal.SIGINT) is handler
            _interrupt_self()
        assert seen == [signal.SIGINT]
        assert not interrupt.caught
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("default_sigint")
def test_other_threads_do_not_touch_the_handler() -> None:
    inside: list[object] = []

    def body() -> None:
        with DeferInterrupt():
            inside.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert inside == [signal.default_int_handler]


@pytest.mark.usefixtures("default_sigint")
def test_run_windowed_never_interrupts_a_submit_halfway() -> None:
    """SIGINT inside submit: the submit completes, its future is cancelled."""
    futures: list[concurrent.futures.Future[object]] = []
    completed: list[int] = []

    def submit(chunk: object) -> concurrent.futures.Future[object]:
        future: concurrent.futures.Future[object] = concurrent.futures.Future()
        futures.append(future)
        _interrupt_self()
        completed.append(len(futures))  # the rest of the submit still runs
        return future

    ctx = _ctx()
    stream = run_windowed(
        submit,
        make_chunks(range(4), 1),
        ctx,
        max_in_flight=2,
        timeout_errors=(concurrent.futures.TimeoutError,),
    )
    with pytest.raises(KeyboardInterrupt):
        next(stream)
    assert completed == [1]
    assert [future.cancelled() for future in futures] == [True]
    assert ctx.is_cancelled()


@pytest.mark.usefixtures("default_sigint")
def test_run_windowed_raises_a_sigint_during_the_wait_within_a_poll() -> None:
    future: concurrent.futures.Future[object] = concurrent.futures.Future()
    timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
    # If the interrupt were lost, the chunk "finishes" after 3 s: a failure,
    # not a hang.
    backstop = threading.Timer(3.0, future.set_result, ("finished",))
    backstop.start()
    ctx = _ctx()
    stream = run_windowed(
        lambda chunk: future,
        make_chunks(range(1), 1),
        ctx,
        max_in_flight=1,
        timeout_errors=(concurrent.futures.TimeoutError,),
    )
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            next(stream)
    finally:
        timer.cancel()
        backstop.cancel()
    assert time.monotonic() - started < 0.1 + 4 * POLL_INTERVAL_S
    assert future.cancelled()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
