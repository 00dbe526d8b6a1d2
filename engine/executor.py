"""``ParallelExecutor``: the facade users hold.

::

    caller thread
      map/imap ──▶ plan (off? nested? gated? auto?) ──▶ Strategy.run(chunks)
        ▲                                                   │
        └──── results in input order ◀── (chunk, results) ◀─┘
      cancel() (any thread) ──▶ RunContext.cancel() of every active run

The executor owns the lifecycle, the payload store, the telemetry and the
strategies it has started (kept warm until shutdown); a strategy owns its
workers. How auto runs a map (probe, one loop, a split, a pool) is
``engine._auto_runs.AutoRuns``, mixed in.
"""

from __future__ import annotations

import itertools
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, final

from engine import _env, _planner, strategies
from engine._attach import readonly_view
from engine._auto_runs import AutoRuns
from engine._chunks import Chunk, plan_chunks
from engine._context import usable_cpu_count
from engine._planner import AutoPlanner, Plan
from engine._state import ExecutorState, Lifecycle, is_nested
from engine.auto import TARGET_CHUNK_S
from engine.config import ParallelConfig
from engine.errors import (
    CancelledError,
    ConfigError,
    FallbackWarning,
    RunTimeoutError,
    StrategyUnavailableError,
)
from engine.forksafe import register_fork_reset
from engine.strategies.base import RunContext, Strategy
from engine.telemetry import Telemetry

if TYPE_CHECKING:
    from engine.payload import PayloadStore


def _flatten(blocks: Iterator[list[Any]]) -> Iterator[Any]:
    """Stream results; closing the stream closes (and so ends) the run."""
    try:
        for block in blocks:
            yield from block
    finally:
        close = getattr(blocks, "close", None)
        if close is not None:
            close()


@final
class ParallelExecutor(AutoRuns):
    """Run ``fn`` over many items with the configured strategy.

    Parameters
    ----------
    config : ParallelConfig or None
        The configuration; ``None`` means ``ParallelConfig.from_env()``.
    **overrides
        Config fields that replace those of ``config``.

    Examples
    --------
    >>> from engine import ParallelConfig, ParallelExecutor
    >>> with ParallelExecutor(ParallelConfig(strategy="threads")) as ex:
    ...     ex.map(abs, [-1, -2, 3])
    [1, 2, 3]
    """

    def __init__(self, config: ParallelConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = ParallelConfig.from_env(**overrides)
        elif not isinstance(config, ParallelConfig):
            msg = f"config={config!r} is not a ParallelConfig; build one with ParallelConfig(...)"
            raise ConfigError(msg)
        elif overrides:
            config = config.replace(**overrides)
        self._config = config
        self._lifecycle = Lifecycle()
        self._lock = threading.Lock()
        self._strategies: dict[str, Strategy] = {}
        # A strategy that failed to start is not tried again by this executor.
        self._unavailable: dict[str, StrategyUnavailableError] = {}
        self._payloads: PayloadStore | None = None
        self._active: set[RunContext] = set()
        self._planner = AutoPlanner(config)
        self.telemetry = Telemetry(callback=config.telemetry)
        # A forked child must not drive its parent's pools, nor count its runs.
        register_fork_reset(self)

    def forksafe_reset(self) -> None:
        """Forget the parent's workers, payloads and runs (forked child only).

        The child's copy keeps its configuration and state; its next run
        starts its own strategy. The parent's processes and segments stay the
        parent's to close (the payload store resets its ownership itself).
        """
        self._lock = threading.Lock()
        self._strategies = {}
        self._unavailable = {}
        self._payloads = None
        self._active = set()
        self._planner = AutoPlanner(self._config)
        self.telemetry = Telemetry(callback=self._config.telemetry)

    # -- lifecycle -------------------------------------------------------------

    @property
    def config(self) -> ParallelConfig:
        """The configuration this executor was built with."""
        return self._config

    @property
    def state(self) -> ExecutorState:
        """Where the executor is in its lifecycle."""
        return self._lifecycle.state

    def __enter__(self) -> ParallelExecutor:
        self._lifecycle.move(ExecutorState.RUNNING)
        name = self._config.strategy
        if name in ("auto", "serial") or _env.is_forced_off() or is_nested():
            return self
        try:
            self._strategy(name, self._workers_for(name))
        except StrategyUnavailableError:
            if self._config.force_serial_on_failure:
                return self  # every run falls back, with a FallbackWarning
            self.shutdown(wait=True)
            raise
        except BaseException:
            self.shutdown(wait=True)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown(wait=True)

    def shutdown(self, wait: bool = True) -> None:
        """Cancel active runs, stop every worker and unlink shared memory.

        Idempotent. With ``wait=False`` workers are told to stop but not
        joined.
        """
        if self._lifecycle.state is ExecutorState.SHUT_DOWN:
            return
        self._lifecycle.move(ExecutorState.SHUT_DOWN)
        for ctx in list(self._active):
            ctx.cancel("the executor was shut down")
        with self._lock:
            started, self._strategies = list(self._strategies.values()), {}
            payloads, self._payloads = self._payloads, None
        try:
            for strategy in started:
                strategy.shutdown(wait=wait)
        finally:
            if payloads is not None:
                payloads.close()

    # -- payloads ----------------------------------------------------------------

    def _payload_store(self) -> PayloadStore:
        with self._lock:
            if self._payloads is None:
                from engine.payload import PayloadStore

                self._payloads = PayloadStore(
                    threshold_bytes=self._config.shm_threshold_bytes
                )
            return self._payloads

    def _runs_in_process_only(self) -> bool:
        return (
            self._config.strategy in ("serial", "threads")
            or _env.is_forced_off()
            or is_nested()
        )

    def share(self, obj: Any) -> Any:
        """Place ``obj`` where every worker can read it without copies.

        Under the serial and threads strategies this returns a read-only
        view of an array (the object itself otherwise); elsewhere a small
        handle that ``map`` resolves to a read-only view in each worker.

        Parameters
        ----------
        obj : numpy.ndarray or object
            An array (shared memory) or any picklable object (pickled once,
            unpickled once per worker).
        """
        self._lifecycle.require_running("share")
        if self._runs_in_process_only():
            return readonly_view(obj)
        return self._payload_store().share(obj)

    # -- planning ----------------------------------------------------------------

    def _workers_for(self, name: str) -> int:
        if name == "serial":
            return 1
        return self._config.max_workers or usable_cpu_count()

    def _strategy(self, name: str, workers: int) -> Strategy:
        with self._lock:
            strategy = self._strategies.get(name)
            if strategy is not None:
                return strategy
            if name in self._unavailable:
                raise self._unavailable[name]
        try:
            cls = strategies.load(name)
            payloads = None if cls.IN_PROCESS else self._payload_store()
            strategy = cls(self._config, workers=workers, payloads=payloads)
            strategy.start()
        except StrategyUnavailableError as exc:
            with self._lock:
                self._unavailable[name] = exc
            raise
        with self._lock:
            self._strategies[name] = strategy
        return strategy

    def _plan(self, n_items: int | None) -> Plan:
        """Decide what runs, before any item is touched (auto decides later)."""
        cfg = self._config
        if _env.is_forced_off():
            return Plan("serial", 1, None, "CE_PARALLEL=off", False)
        if is_nested():
            return Plan(
                "serial", 1, None, "nested: executor used inside a worker", True
            )
        if cfg.strategy == "serial":
            return Plan("serial", 1, None, "configured", False)
        if n_items is not None and n_items < cfg.min_batch_size:
            reason = f"gated: {n_items} items < min_batch_size={cfg.min_batch_size}"
            return Plan("serial", 1, None, reason, False)
        if cfg.strategy == "auto":
            return Plan("auto", 1, None, "auto", False)
        return Plan(
            cfg.strategy, self._workers_for(cfg.strategy), None, "configured", False
        )

    # -- running -----------------------------------------------------------------

    def map(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        *extra_args: Any,
        chunk_size: int | None = None,
    ) -> list[Any]:
        """Return ``[fn(item, *extra_args) for item in items]``, in parallel.

        Parameters
        ----------
        fn : callable
            Called as ``fn(item, *extra_args)``; handles from ``share`` in
            ``extra_args`` arrive as read-only views.
        items : iterable
            The work items; the result keeps their order.
        *extra_args
            Passed to every call after the item.
        chunk_size : int or None
            Items per chunk; default ``instance_chunk_size``, else adaptive.

        Raises
        ------
        CancelledError
            ``cancel()`` was called during the run.
        RunTimeoutError
            The run exceeded ``timeout_s``.
        ExecutorStateError
            The executor is not entered, or shut down.
        """
        if not isinstance(items, Sequence):
            items = list(items)
        out: list[Any] = []
        for block in self._blocks(fn, items, extra_args, chunk_size):
            out.extend(block)
        return out

    def imap(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        *extra_args: Any,
        chunk_size: int | None = None,
    ) -> Iterator[Any]:
        """Yield ``fn(item, *extra_args)`` in input order, streaming.

        At most a bounded number of chunks is in flight, so results that
        are not consumed hold workers back instead of filling memory.
        Parameters and errors as for ``map``.
        """
        return _flatten(self._blocks(fn, items, extra_args, chunk_size))

    def _blocks(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        extra_args: tuple[Any, ...],
        chunk_size: int | None,
    ) -> Iterator[list[Any]]:
        """Validate and plan now; return an iterator of result blocks in order."""
        self._lifecycle.require_running("imap")
        if not callable(fn):
            msg = f"fn={fn!r} is not callable"
            raise TypeError(msg)
        if chunk_size is not None and not (
            isinstance(chunk_size, int)
            and not isinstance(chunk_size, bool)
            and chunk_size >= 1
        ):
            msg = f"chunk_size={chunk_size!r} is invalid; allowed: an int >= 1 or None"
            raise ConfigError(msg)
        n_items = len(items) if isinstance(items, Sequence) else None
        plan = self._plan(n_items)
        if plan.strategy == "auto":
            return self._auto_blocks(fn, items, extra_args, chunk_size, n_items)
        return self._start_run(plan, fn, items, extra_args, chunk_size, n_items)

    def _start_run(
        self,
        plan: Plan,
        fn: Callable[..., Any],
        items: Iterable[Any],
        extra_args: tuple[Any, ...],
        chunk_size: int | None,
        n_items: int | None,
    ) -> Iterator[list[Any]]:
        """Start ``plan``'s strategy; return the stream of result blocks."""
        strategy, used, cold = self._start_strategy(plan)
        ctx = self._context(strategy, used, requested=plan)
        chunks = self._chunks(used, ctx, items, chunk_size, n_items, offset=0)
        stream = self._stream(strategy, fn, chunks, extra_args, ctx, observe=not cold)
        if strategy.STARTS_EAGERLY:
            # Dispatch now; the strategy's first block is an empty marker.
            for _ in itertools.islice(stream, 1):
                pass
        return stream

    def _args_for(
        self, strategy: Strategy, extra_args: tuple[Any, ...]
    ) -> tuple[Any, ...]:
        if strategy.IN_PROCESS and self._payloads is not None:
            return self._payloads.resolve_local(extra_args)
        return extra_args

    def _context(
        self, strategy: Strategy, used: Plan, *, requested: Plan
    ) -> RunContext:
        recorder = self.telemetry.recorder(
            strategy=used.strategy,
            reason=used.reason,
            workers=used.workers,
            start_method=strategy.start_method,
            nested=used.nested,
            thread_cap=strategy.thread_cap,
        )
        if used.strategy != requested.strategy:
            recorder.record_fallback(used.reason, requested=requested.strategy)
        return RunContext(
            recorder,
            timeout_s=self._config.timeout_s,
            cancel_grace_s=self._config.cancel_grace_s,
        )

    def _chunks(
        self,
        plan: Plan,
        ctx: RunContext,
        items: Iterable[Any],
        chunk_size: int | None,
        n_items: int | None,
        *,
        offset: int,
    ) -> Iterable[Chunk]:
        recorder = ctx.recorder

        def measured() -> tuple[int, float]:
            counts = recorder.counts()
            return int(counts["items"]) - offset, counts["compute_s"]

        return plan_chunks(
            items,
            explicit=chunk_size or self._config.instance_chunk_size,
            n_items=n_items,
            serial=plan.strategy == "serial",
            workers=plan.workers,
            planned_size=plan.chunk_size,
            target_chunk_s=TARGET_CHUNK_S,
            measured=measured,
        )

    def _start_strategy(self, plan: Plan) -> tuple[Strategy, Plan, bool]:
        """Return the strategy to run ``plan`` on, the plan used, and whether
        its pool was started just now (cold workers)."""
        try:
            started = time.perf_counter()
            strategy = self._strategy(plan.strategy, plan.workers)
        except StrategyUnavailableError as exc:
            if not (
                self._config.strategy == "auto" or self._config.force_serial_on_failure
            ):
                raise
            reason = f"{plan.strategy} unavailable ({exc}); ran serially"
            warnings.warn(reason, FallbackWarning, stacklevel=4)
            fallback = Plan("serial", 1, None, reason, plan.nested)
            return self._strategy("serial", 1), fallback, False
        elapsed = time.perf_counter() - started
        if elapsed > 0.005:  # a real start, not a warm pool: remember its cost
            _planner.STARTUP_S[(plan.strategy, self._config.start_method)] = elapsed
            return strategy, plan, True
        return strategy, plan, False

    def _stream(
        self,
        strategy: Strategy,
        fn: Callable[..., Any],
        chunks: Iterable[Chunk],
        extra_args: tuple[Any, ...],
        ctx: RunContext,
        *,
        observe: bool,
    ) -> Iterator[Any]:
        """Run ``chunks`` with ``extra_args`` (shared handles resolved here
        for an in-process strategy); record the run; if ``observe``, refresh
        auto's cost of ``fn`` from it. Not when the pool was just started
        (its first items paid worker start-up: W1's first pooled map
        measured 14x the warm cost), nor for a split map (its caller's share
        measures it)."""
        with self._lock:
            self._active.add(ctx)
            store = self._payloads
        shared_before = (
            store.bytes_shared if store is not None and not strategy.IN_PROCESS else 0
        )
        status = "error"
        try:
            args = self._args_for(strategy, extra_args)
            for _, results in strategy.run(fn, chunks, args, ctx):
                yield results
            status = "ok"
        except CancelledError:
            status = "cancelled"
            ctx.recorder.add(cancellations=1)
            raise
        except RunTimeoutError:
            status = "timeout"
            raise
        except GeneratorExit:
            status = "closed"
            raise
        finally:
            with self._lock:
                self._active.discard(ctx)
            if (
                store is not None
                and not strategy.IN_PROCESS
                and strategy.NAME == "processes"
            ):
                # Segments created during the run (auto-shared arrays); the
                # joblib and dask strategies count their own.
                ctx.recorder.add(bytes_shared=store.bytes_shared - shared_before)
            summary = ctx.recorder.finish(status)
            self.telemetry.add(summary)
            if status == "ok" and observe and self._config.strategy == "auto":
                self._planner.observed(fn, summary.items, summary.compute_s)

    def cancel(self) -> None:
        """Cancel every run in progress; their ``map`` raises ``CancelledError``.

        May be called from any thread. Workers stop at their next item, or
        are replaced after ``cancel_grace_s``. A run that starts after this
        call is not affected.
        """
        with self._lock:
            active = list(self._active)
        for ctx in active:
            ctx.cancel()
