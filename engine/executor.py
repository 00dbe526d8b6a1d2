"""``ParallelExecutor``: the facade users hold.

::

    caller thread
      map/imap ──▶ plan (off? nested? gated? auto?) ──▶ Strategy.run(chunks)
        ▲                                                   │
        └──── results in input order ◀── (chunk, results) ◀─┘
      cancel() (any thread) ──▶ RunContext.cancel() of every active run

The executor owns the lifecycle, the payload store, the telemetry and the
strategies it has started (kept warm until shutdown); a strategy owns its
workers.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, final

import numpy as np

from engine import _env, strategies
from engine._chunks import default_chunk_size, make_chunks
from engine._context import usable_cpu_count
from engine._state import ExecutorState, Lifecycle, is_nested
from engine.auto import Estimate, choose
from engine.config import ParallelConfig
from engine.errors import (
    CancelledError,
    ConfigError,
    FallbackWarning,
    RunTimeoutError,
    StrategyUnavailableError,
)
from engine.strategies.base import RunContext, Strategy
from engine.telemetry import Telemetry

if TYPE_CHECKING:
    from engine.payload import PayloadStore

# Chunk size for an ``imap`` over an iterator of unknown length, when none is
# configured: calibrated-explanations' default instance chunk.
DEFAULT_STREAM_CHUNK_SIZE = 8


class _Plan(NamedTuple):
    strategy: str
    workers: int
    chunk_size: int | None
    reason: str
    nested: bool


def _read_only(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        view = obj.view()
        view.flags.writeable = False
        return view
    return obj


@final
class ParallelExecutor:
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
        self.telemetry = Telemetry(callback=config.telemetry)

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
            return _read_only(obj)
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

    def _plan(self, n_items: int | None) -> _Plan:
        cfg = self._config
        if _env.is_forced_off():
            return _Plan("serial", 1, None, "CE_PARALLEL=off", False)
        if is_nested():
            return _Plan(
                "serial", 1, None, "nested: executor used inside a worker", True
            )
        if cfg.strategy == "serial":
            return _Plan("serial", 1, None, "configured", False)
        if n_items is not None and n_items < cfg.min_batch_size:
            reason = f"gated: {n_items} items < min_batch_size={cfg.min_batch_size}"
            return _Plan("serial", 1, None, reason, False)
        if cfg.strategy != "auto":
            return _Plan(
                cfg.strategy, self._workers_for(cfg.strategy), None, "configured", False
            )
        usable = [
            name for name in strategies.available_strategies() if name not in ("dask",)
        ]
        choice = choose(
            Estimate(
                n_items=n_items,
                usable_cpus=usable_cpu_count(),
                max_workers=cfg.max_workers,
                available=tuple(usable),
                prefer=cfg.prefer,
                task_bytes=cfg.task_size_hint_bytes,
            )
        )
        return _Plan(
            choice.strategy, choice.max_workers, choice.chunk_size, choice.reason, False
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
            Items per chunk; default ``instance_chunk_size`` or automatic.

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
        return list(self.imap(fn, items, *extra_args, chunk_size=chunk_size))

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
        self._lifecycle.require_running("imap")
        if not callable(fn):
            msg = f"fn={fn!r} is not callable"
            raise TypeError(msg)
        if chunk_size is not None and not (
            isinstance(chunk_size, int) and chunk_size >= 1
        ):
            msg = f"chunk_size={chunk_size!r} is invalid; allowed: an int >= 1 or None"
            raise ConfigError(msg)
        n_items = len(items) if isinstance(items, Sequence) else None
        plan = self._plan(n_items)
        return self._run(plan, fn, items, extra_args, chunk_size, n_items)

    def _chunk_size(
        self, plan: _Plan, chunk_size: int | None, n_items: int | None
    ) -> int:
        explicit = chunk_size or self._config.instance_chunk_size or plan.chunk_size
        if explicit:
            return explicit
        if n_items is None:
            return DEFAULT_STREAM_CHUNK_SIZE
        if plan.strategy == "serial":
            return max(1, n_items)
        return default_chunk_size(n_items, plan.workers)

    def _start_strategy(self, plan: _Plan) -> tuple[Strategy, _Plan]:
        try:
            return self._strategy(plan.strategy, plan.workers), plan
        except StrategyUnavailableError as exc:
            if not (
                self._config.strategy == "auto" or self._config.force_serial_on_failure
            ):
                raise
            reason = f"{plan.strategy} unavailable ({exc}); ran serially"
            warnings.warn(reason, FallbackWarning, stacklevel=4)
            fallback = _Plan("serial", 1, None, reason, plan.nested)
            return self._strategy("serial", 1), fallback

    def _run(
        self,
        plan: _Plan,
        fn: Callable[..., Any],
        items: Iterable[Any],
        extra_args: tuple[Any, ...],
        chunk_size: int | None,
        n_items: int | None,
    ) -> Iterator[Any]:
        strategy, used = self._start_strategy(plan)
        recorder = self.telemetry.recorder(
            strategy=used.strategy,
            reason=used.reason,
            workers=used.workers,
            start_method=strategy.start_method,
            nested=used.nested,
            thread_cap=strategy.thread_cap,
        )
        if used is not plan:
            recorder.record_fallback(used.reason, requested=plan.strategy)
        ctx = RunContext(
            recorder,
            timeout_s=self._config.timeout_s,
            cancel_grace_s=self._config.cancel_grace_s,
        )
        size = self._chunk_size(used, chunk_size, n_items)
        if strategy.IN_PROCESS and self._payloads is not None:
            extra_args = self._payloads.resolve_local(extra_args)
        return self._stream(strategy, fn, make_chunks(items, size), extra_args, ctx)

    def _stream(
        self,
        strategy: Strategy,
        fn: Callable[..., Any],
        chunks: Iterable[Any],
        extra_args: tuple[Any, ...],
        ctx: RunContext,
    ) -> Iterator[Any]:
        with self._lock:
            self._active.add(ctx)
        status = "error"
        try:
            for _, results in strategy.run(fn, chunks, extra_args, ctx):
                yield from results
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
            self.telemetry.add(ctx.recorder.finish(status))

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
