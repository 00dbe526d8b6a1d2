"""How the auto strategy runs a map: probe, one loop, a split, or a pool.

::

    map ──▶ fn's cost known?
              no  ──▶ probe the first items in the caller (results kept),
                      then auto.choose for the rest        (_auto)
              yes ──▶ >= MIN_PARALLEL_WORK_S: the chosen strategy, no probe
                                                            (_auto_known)
                      smaller, and the process pool pays: the caller runs
                      its share while the pool runs the rest (_auto_split)
                      else: one loop in the caller          (_auto_tiny)

``AutoRuns`` is the half of ``engine.executor.ParallelExecutor`` that runs
auto's maps; the executor (the subclass) owns the strategies, the runs and
their telemetry, sets every attribute annotated below in its ``__init__``
and defines the methods annotated as callables.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from engine import strategies
from engine._chunks import Chunk, call_into, make_chunks
from engine._planner import NO_ITEM, AutoPlanner, Plan, ran_in_caller
from engine.auto import MIN_PARALLEL_WORK_S, MIN_SPLIT_WORK_S, Split
from engine.config import ParallelConfig
from engine.errors import StrategyUnavailableError
from engine.strategies.base import RunContext, Strategy
from engine.telemetry import Telemetry

if TYPE_CHECKING:
    from engine.payload import PayloadStore


class AutoRuns:
    """auto's paths through a map (mixed into ``ParallelExecutor``)."""

    # Set by ParallelExecutor.__init__.
    telemetry: Telemetry
    _config: ParallelConfig
    _lock: threading.Lock
    _planner: AutoPlanner
    _strategies: dict[str, Strategy]
    _unavailable: dict[str, StrategyUnavailableError]
    _payloads: PayloadStore | None
    # Defined by ParallelExecutor: the strategies and the runs.
    _workers_for: Callable[[str], int]
    _strategy: Callable[[str, int], Strategy]
    _start_strategy: Callable[[Plan], tuple[Strategy, Plan, bool]]
    _args_for: Callable[[Strategy, tuple[Any, ...]], tuple[Any, ...]]
    _context: Callable[..., RunContext]
    _chunks: Callable[..., Iterable[Chunk]]
    _stream: Callable[..., Iterator[Any]]
    _start_run: Callable[..., Iterator[list[Any]]]

    def _auto_blocks(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        extra_args: tuple[Any, ...],
        chunk_size: int | None,
        n_items: int | None,
    ) -> Iterator[list[Any]]:
        """Run a map under auto; return its result blocks in order."""
        known = self._planner.known_cost(fn, n_items, items)
        if known is None or n_items is None or not isinstance(items, Sequence):
            return self._auto(fn, items, extra_args, chunk_size, n_items)
        # A known cost skips the probe: big maps go to the chosen strategy,
        # tiny ones run in the caller in one loop, cheaper than the serial
        # strategy's chunks (W4, W6, W7), or share the process pool.
        if known * n_items >= MIN_PARALLEL_WORK_S:
            return self._auto_known(fn, items, extra_args, chunk_size, known)
        split = self._split(fn, n_items, known, items, chunk_size)
        if split is not None:
            return self._auto_split(fn, items, extra_args, known, *split)
        return self._auto_tiny(fn, items, extra_args, known)

    def _caller_args(self, extra_args: tuple[Any, ...]) -> tuple[Any, ...]:
        """``extra_args`` as the caller's own items see them (handles resolved)."""
        return self._args_for(self._strategy("serial", 1), extra_args)

    def _choose(
        self,
        fn: Callable[..., Any],
        n_items: int | None,
        item_cost_s: float | None,
        item: Any,
    ) -> Plan:
        """Ask auto, with what this executor measured and holds warm."""
        with self._lock:
            warm = set(self._strategies)
            shared_bytes = (
                self._payloads.bytes_shared if self._payloads is not None else 0
            )
        return self._planner.choose(
            fn, n_items, item_cost_s, item, warm=warm, shared_bytes=shared_bytes
        )

    def _auto(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        extra_args: tuple[Any, ...],
        chunk_size: int | None,
        n_items: int | None,
    ) -> Iterator[Any]:
        """Probe the first items serially (results kept), choose, run the rest."""
        probe: list[Any] = []
        item_cost_s = None
        first: Any = NO_ITEM
        if n_items is not None and isinstance(items, Sequence) and n_items:
            first = items[0]
            local_args = self._caller_args(extra_args)
            probe, item_cost_s = self._planner.probe(fn, items, local_args, n_items)
        remaining = n_items - len(probe) if n_items is not None else None
        if remaining == 0:
            reason = ran_in_caller(item_cost_s * len(probe), "")
            plan = Plan("serial", 1, None, reason, False)
        else:
            plan = self._choose(fn, remaining, item_cost_s, first)
        strategy, used, cold = self._start_strategy(plan)
        ctx = self._context(strategy, used, requested=plan)
        if probe:
            ctx.recorder.add(
                items=len(probe), chunks=1, compute_s=item_cost_s * len(probe)
            )
        yield probe
        if remaining == 0:  # the probe ran the whole map and measured it
            self.telemetry.add(ctx.recorder.finish("ok"))
            return
        rest = items[len(probe) :] if probe else items
        chunks = self._chunks(used, ctx, rest, chunk_size, remaining, offset=len(probe))
        yield from self._stream(strategy, fn, chunks, extra_args, ctx, observe=not cold)

    def _auto_tiny(
        self,
        fn: Callable[..., Any],
        items: Sequence[Any],
        extra_args: tuple[Any, ...],
        item_cost_s: float,
    ) -> Iterator[list[Any]]:
        """auto when ``fn``'s known cost puts the whole map under MIN_PARALLEL_WORK_S.

        One loop in the caller and one telemetry record, nothing else: the
        probe path's steps (batches and clock reads, a plan, a run context
        with its cancel event) cost W6 (5 items of 1 ms) 4-6 % over a plain
        loop; W7 (20 maps of 10 items) paid 5 probe steps a map.
        """
        local_args = self._caller_args(extra_args)
        results: list[Any] = []
        started = time.perf_counter()
        call_into(results, fn, items, local_args)
        elapsed = time.perf_counter() - started
        reason = ran_in_caller(item_cost_s * len(items), " (known cost)")
        self.telemetry.add_caller_run(reason, len(results), elapsed)
        self._planner.observed(fn, len(results), elapsed)
        yield results

    def _split(
        self,
        fn: Callable[..., Any],
        n_items: int,
        known: float,
        items: Sequence[Any],
        chunk_size: int | None,
    ) -> tuple[Split, str] | None:
        """Whether a tiny map of known cost shares the process pool (and why).

        Not with an explicit chunk size (those always win), nor where the
        process strategy cannot run.
        """
        if (
            known * n_items < MIN_SPLIT_WORK_S
            or chunk_size is not None
            or self._config.instance_chunk_size is not None
            or "processes" in self._unavailable
            or strategies.unavailable_reason("processes") is not None
        ):
            return None
        return self._planner.split(
            fn,
            n_items,
            known,
            items[0],
            warm="processes" in self._strategies,
            workers=self._workers_for("processes"),
        )

    def _auto_split(
        self,
        fn: Callable[..., Any],
        items: Sequence[Any],
        extra_args: tuple[Any, ...],
        item_cost_s: float,
        split: Split,
        reason: str,
    ) -> Iterator[list[Any]]:
        """auto for a tiny map that shares the process pool with the caller.

        The pool's chunks are dispatched first; the caller then runs the
        first ``split.caller_items`` itself, then collects the pool's results
        and yields the whole map at once (no consumer runs in between, so its
        wall time is the split's own). W6 (5 items of 1 ms) takes 3.8-4.2 ms
        so, against 5.0 ms in one loop and 4.1-4.6 ms with the whole map on
        the warm pool; the map's own overhead (plan, dispatch, collect:
        ~0.9 ms) is the rest. The caller's share refreshes ``fn``'s cost, and
        the wall time against that share's cost tells the planner whether
        splitting ``fn`` pays (``AutoPlanner.split_done``).
        """
        plan = Plan("processes", self._workers_for("processes"), None, reason, False)
        strategy, used, cold = self._start_strategy(plan)
        if used.strategy != "processes":  # could not start: one loop here
            yield from self._auto_tiny(fn, items, extra_args, item_cost_s)
            return
        started = time.perf_counter()
        ctx = self._context(strategy, used, requested=plan)
        head = split.caller_items
        stream = self._stream(
            strategy,
            fn,
            make_chunks(items[head:], split.chunk_size),
            extra_args,
            ctx,
            observe=False,
        )
        for _ in itertools.islice(stream, 1):  # dispatched: the marker block
            pass
        local_args = self._caller_args(extra_args)
        results: list[Any] = []
        try:
            began = time.perf_counter()
            call_into(results, fn, items[:head], local_args)
            caller_s = time.perf_counter() - began
            ctx.recorder.add(items=head, chunks=1, compute_s=caller_s)
            for block in stream:
                results.extend(block)
        finally:
            stream.close()  # at once on an error: the pool's part is cancelled
        wall_s = time.perf_counter() - started
        self._planner.observed(fn, head, caller_s)
        if not cold:
            self._planner.split_done(fn, wall_s, caller_s / head * len(items))
        yield results

    def _auto_known(
        self,
        fn: Callable[..., Any],
        items: Sequence[Any],
        extra_args: tuple[Any, ...],
        chunk_size: int | None,
        item_cost_s: float,
    ) -> Iterator[list[Any]]:
        """auto without a probe: ``fn``'s cost per item was measured before.

        The whole map goes to the chosen strategy, started now (a processes
        pool dispatches before the first ``next``), instead of its first
        items running in the caller again: with 4 chunks a call, the probe
        kept a quarter of a calibrated-explanations call serial.
        """
        n_items = len(items)
        plan = self._choose(fn, n_items, item_cost_s, items[0])
        return self._start_run(plan, fn, items, extra_args, chunk_size, n_items)
