"""The ``Strategy`` interface, the per-run context, and a bounded ordered window.

A strategy runs chunks of one run and yields ``(chunk, results)`` in chunk
order. The executor owns chunking, gating, telemetry and the lifecycle; a
strategy owns its workers. Strategies that run ``fn`` in the caller's process
(``IN_PROCESS = True``) receive ``extra_args`` with payload handles already
resolved; the others resolve them in their workers.
"""

from __future__ import annotations

import _signal  # signal's C core: signal.signal's enum wrapping costs ~10 us a call
import abc
import collections
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from engine._chunks import Chunk
from engine.errors import CancelledError, RunTimeoutError

if TYPE_CHECKING:
    from engine.config import ParallelConfig
    from engine.payload import PayloadStore
    from engine.telemetry import RunRecorder

# How often a waiting caller wakes to check for cancel and timeout. Cancel
# must surface within 1 s (FAULTS.md #9); 50 ms keeps the wake-ups cheap.
POLL_INTERVAL_S = 0.05
_SIGINT = int(signal.SIGINT)


class RunContext:
    """One run's cancel flag, deadline and recorder.

    ``cancel()`` may be called from any thread; the strategy's waiting loops
    call ``check()``.
    """

    def __init__(
        self,
        recorder: RunRecorder,
        *,
        timeout_s: float | None = None,
        cancel_grace_s: float = 1.0,
    ) -> None:
        self.recorder = recorder
        self.timeout_s = timeout_s
        self.cancel_grace_s = cancel_grace_s
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._cancel = threading.Event()
        self.cancel_reason: str | None = None

    def cancel(self, reason: str = "cancel() was called") -> None:
        """Ask the run to stop; workers see it between items."""
        if not self._cancel.is_set():
            self.cancel_reason = reason
        self._cancel.set()

    def is_cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def cancel_event(self) -> threading.Event:
        return self._cancel

    def remaining_s(self) -> float | None:
        """Seconds left before the deadline (``None`` without a timeout)."""
        if self.deadline is None:
            return None
        return self.deadline - time.monotonic()

    def is_timed_out(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def check(self) -> None:
        """Raise ``CancelledError`` or ``RunTimeoutError`` if the run must stop."""
        if self._cancel.is_set():
            msg = f"the run was cancelled ({self.cancel_reason})"
            raise CancelledError(msg)
        if self.is_timed_out():
            self.cancel(f"timeout_s={self.timeout_s} exceeded")
            msg = (
                f"the run exceeded timeout_s={self.timeout_s} s; raise "
                "ParallelConfig.timeout_s (CE_PARALLEL token timeout=) or "
                "reduce the work"
            )
            raise RunTimeoutError(msg)


class Strategy(abc.ABC):
    """How chunks are run: in the caller, on threads, on processes, ...

    Called from the caller's thread that runs the map, except ``cancel``,
    which any thread may call.
    """

    NAME: ClassVar[str]
    IN_PROCESS: ClassVar[bool] = False
    # True if ``run`` yields one empty block right after its first dispatch:
    # the executor then starts the run when ``imap`` is called (as
    # concurrent.futures' ``Executor.map`` submits at call time), so the
    # caller's own work between ``imap`` and the first ``next`` overlaps the
    # workers. In-process strategies run chunks in the consuming thread.
    STARTS_EAGERLY: ClassVar[bool] = False

    def __init__(
        self,
        config: ParallelConfig,
        *,
        workers: int,
        payloads: PayloadStore | None = None,
    ) -> None:
        self.config = config
        self.workers = max(1, workers)
        self.payloads = payloads

    @property
    def start_method(self) -> str | None:
        """The process start method in use, or ``None``."""
        return None

    @property
    def thread_cap(self) -> int | None:
        """BLAS/OpenMP/numba threads per worker, or ``None`` if not capped."""
        return None

    def start(self) -> None:  # noqa: B027 - optional hook
        """Start workers (idempotent); in-process strategies need nothing."""

    @abc.abstractmethod
    def run(
        self,
        fn: Callable[..., Any],
        chunks: Iterable[Chunk],
        extra_args: tuple[Any, ...],
        ctx: RunContext,
    ) -> Iterator[tuple[Chunk, list[Any]]]:
        """Run every chunk; yield ``(chunk, results)`` in chunk order."""

    def cancel(self) -> None:  # noqa: B027 - optional hook
        """Stop work of the current run by force (after the grace period)."""

    def shutdown(self, *, wait: bool = True) -> None:  # noqa: B027 - optional hook
        """Release the workers (idempotent)."""


class DeferInterrupt:
    """While the main thread runs a step, Ctrl-C waits until it is over.

    A KeyboardInterrupt between two lines of bookkeeping would leave it
    half-updated: a chunk popped, never settled; a frame half-written; a
    lock inside a pool library held forever, after which shutting that pool
    down hangs. Inside the block SIGINT only sets ``caught``; the step's
    waits are capped (``POLL_INTERVAL_S``, the dispatcher's tick) and check
    it, so the interrupt still surfaces within well under a second (FAULTS.md
    #8), raised at a point where nothing is half-done, or on leaving the
    block. The swap is made only for Python's default handler, in the main
    thread; a block is never held across a ``yield`` to the caller's code.
    """

    def __init__(self) -> None:
        self.caught = False
        self._previous: Any = None

    def __enter__(self) -> DeferInterrupt:
        if (
            threading.current_thread() is threading.main_thread()
            and _signal.getsignal(_SIGINT) is signal.default_int_handler
        ):
            self._previous = _signal.signal(_SIGINT, self._note)
        return self

    def _note(self, signum: int, frame: object) -> None:
        self.caught = True

    def check(self) -> None:
        """Raise the deferred KeyboardInterrupt now, at a safe point."""
        if self.caught:
            raise KeyboardInterrupt

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            _signal.signal(_SIGINT, self._previous)
        if self.caught and exc_info[0] is None:
            raise KeyboardInterrupt


class FutureLike(Protocol):
    """What ``run_windowed`` needs of a future."""

    def result(self, timeout: float | None = None) -> Any: ...

    def cancel(self) -> bool: ...

    def done(self) -> bool: ...


def run_windowed(
    submit: Callable[[Chunk], FutureLike],
    chunks: Iterable[Chunk],
    ctx: RunContext,
    *,
    max_in_flight: int,
    timeout_errors: tuple[type[BaseException], ...],
) -> Iterator[tuple[Chunk, Any]]:
    """Submit chunks with at most ``max_in_flight`` pending; yield in order.

    ``submit`` returns a future whose result is the chunk's outcome; waiting
    wakes every ``POLL_INTERVAL_S`` to honour cancel and timeout. On any exit
    (error, cancel, the consumer closing the generator) the run is cancelled
    and pending futures are cancelled.
    """
    window: collections.deque[tuple[Chunk, FutureLike]] = collections.deque()
    source = iter(chunks)
    exhausted = False
    try:
        while True:
            while not exhausted and len(window) < max_in_flight:
                ctx.check()
                chunk = next(source, None)  # the caller's items: interruptible
                if chunk is None:
                    exhausted = True
                    break
                # Ctrl-C never lands inside a pool's submit (a lock held
                # forever there hangs the pool's shutdown).
                with DeferInterrupt():
                    window.append((chunk, submit(chunk)))
            if not window:
                return
            chunk, future = window[0]
            with DeferInterrupt() as interrupt:
                while True:
                    ctx.check()
                    interrupt.check()
                    try:
                        outcome = future.result(timeout=POLL_INTERVAL_S)
                    except timeout_errors:
                        if not future.done():
                            continue
                        # Finished meanwhile, or fn itself raised TimeoutError.
                        outcome = future.result(timeout=0)
                    break
                window.popleft()
            yield chunk, outcome
    finally:
        if window:
            ctx.cancel(ctx.cancel_reason or "the run stopped early")
            for _, future in window:
                future.cancel()
