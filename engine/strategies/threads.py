"""The threads strategy: chunks on a ``ThreadPoolExecutor`` kept warm.

Best for work that releases the GIL (numba ``nogil`` kernels, numpy on large
arrays, I/O). Threads cannot be killed: on cancel or timeout the map returns
at once and running chunks stop at their next item.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, final

from engine._chunks import Chunk, run_chunk
from engine.strategies.base import RunContext, Strategy, run_windowed

# Chunks queued per worker beyond the running one: keeps threads busy while
# bounding memory held by finished-but-unconsumed results (imap streaming).
IN_FLIGHT_PER_WORKER = 2


def _timed_chunk(
    fn: Callable[..., Any],
    chunk: Chunk,
    extra_args: tuple[Any, ...],
    ctx: RunContext,
    submitted_at: float,
) -> tuple[list[Any], float, float]:
    wait_s = time.perf_counter() - submitted_at
    results, compute_s = run_chunk(
        fn, chunk.items, extra_args, is_cancelled=ctx.is_cancelled
    )
    return results, compute_s, wait_s


@final
class ThreadsStrategy(Strategy):
    """Run chunks on a pool of threads in the caller's process."""

    NAME: ClassVar[str] = "threads"
    IN_PROCESS: ClassVar[bool] = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.workers, thread_name_prefix="engine-worker"
                )

    def run(
        self,
        fn: Callable[..., Any],
        chunks: Iterable[Chunk],
        extra_args: tuple[Any, ...],
        ctx: RunContext,
    ) -> Iterator[tuple[Chunk, list[Any]]]:
        self.start()
        pool = self._pool
        assert pool is not None

        def submit(chunk: Chunk) -> concurrent.futures.Future:
            started = time.perf_counter()
            future = pool.submit(_timed_chunk, fn, chunk, extra_args, ctx, started)
            ctx.recorder.add(dispatch_overhead_s=time.perf_counter() - started)
            return future

        for chunk, (results, compute_s, wait_s) in run_windowed(
            submit,
            chunks,
            ctx,
            max_in_flight=self.workers * IN_FLIGHT_PER_WORKER,
            timeout_errors=(concurrent.futures.TimeoutError,),
        ):
            ctx.recorder.add(
                chunks=1, items=len(chunk), compute_s=compute_s, queue_wait_s=wait_s
            )
            yield chunk, results

    def shutdown(self, *, wait: bool = True) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)
