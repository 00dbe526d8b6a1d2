"""Telemetry, schema version 1: per-run summaries, events, JSON export.

A ``RunRecorder`` collects one run's counters from any thread (strategies
call it from their worker or collector threads); ``finish()`` freezes them
into a ``RunSummary``. ``Telemetry`` keeps an executor's summaries, hands each
event to the user's callback and logs decisions on ``logging.getLogger("engine")``
at DEBUG. Fields a strategy cannot measure stay at their documented default
(0, or ``None`` where "unknown" differs from zero); see docs/telemetry.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, final

SCHEMA_VERSION: Final = 1
# Run summaries an executor keeps (the most recent); totals cover every run.
# A summary is ~1 KB: a plugin executor living for a service's lifetime, one
# run per explain call, would otherwise grow without bound.
KEEP_RUNS: Final = 1000

logger = logging.getLogger("engine")
_run_ids = itertools.count(1)


@final
@dataclass(frozen=True)
class RunSummary:
    """The frozen record of one ``map``/``imap`` run (schema version 1)."""

    run_id: int
    strategy: str
    reason: str
    workers: int
    start_method: str | None
    chunks: int
    items: int
    wall_s: float
    compute_s: float
    queue_wait_s: float
    dispatch_overhead_s: float
    utilisation: float
    bytes_pickled: int
    bytes_shared: int
    fallbacks: tuple[dict[str, Any], ...]
    failures: int
    cancellations: int
    worker_restarts: int
    nested: bool
    thread_cap: int | None
    status: str
    schema_version: int = SCHEMA_VERSION

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        out = {name: getattr(self, name) for name in _SUMMARY_FIELDS}
        out["fallbacks"] = [dict(item) for item in self.fallbacks]
        return out


_SUMMARY_FIELDS: Final = tuple(item.name for item in dataclasses.fields(RunSummary))
# The fields every run done in one loop in the caller shares (add_caller_run).
_CALLER_RUN: Final = {
    "strategy": "serial",
    "workers": 1,
    "start_method": None,
    "chunks": 1,
    "queue_wait_s": 0.0,
    "dispatch_overhead_s": 0.0,
    "bytes_pickled": 0,
    "bytes_shared": 0,
    "fallbacks": (),
    "failures": 0,
    "cancellations": 0,
    "worker_restarts": 0,
    "nested": False,
    "thread_cap": None,
    "status": "ok",
    "schema_version": SCHEMA_VERSION,
}


@final
class RunRecorder:
    """Mutable, thread-safe counters of one run.

    Any thread may call the ``add_*``/``record_*`` methods; the thread that
    started the run calls ``finish`` once.
    """

    def __init__(
        self,
        *,
        strategy: str,
        reason: str,
        workers: int,
        start_method: str | None = None,
        nested: bool = False,
        thread_cap: int | None = None,
        emit: Callable[[dict[str, Any]], None] | None = None,
        wants_events: Callable[[], bool] | None = None,
    ) -> None:
        self.run_id = next(_run_ids)
        self._lock = threading.Lock()
        self._started = time.perf_counter()
        self._emit = emit
        self._wants_events = wants_events
        self.strategy = strategy
        self.reason = reason
        self.workers = workers
        self.start_method = start_method
        self.nested = nested
        self.thread_cap = thread_cap
        self._counts: dict[str, float] = dict.fromkeys(
            (
                "chunks",
                "items",
                "compute_s",
                "queue_wait_s",
                "dispatch_overhead_s",
                "bytes_pickled",
                "bytes_shared",
                "failures",
                "cancellations",
                "worker_restarts",
            ),
            0,
        )
        self._fallbacks: list[dict[str, Any]] = []
        self.summary: RunSummary | None = None

    def add(self, **amounts: float) -> None:
        """Add to named counters, e.g. ``add(chunks=1, items=8, compute_s=0.1)``."""
        with self._lock:
            for name, amount in amounts.items():
                if name not in self._counts:
                    msg = f"unknown telemetry counter {name!r}; known: {sorted(self._counts)}"
                    raise KeyError(msg)
                self._counts[name] += amount

    def counts(self) -> dict[str, float]:
        """Return a snapshot of the counters (any thread)."""
        with self._lock:
            return dict(self._counts)

    def record_fallback(self, reason: str, **detail: Any) -> None:
        """Note that part of the run ran other than asked, and why."""
        event = {"reason": reason, **detail}
        with self._lock:
            self._fallbacks.append(event)
        self.emit("fallback", **event)

    def set_strategy(self, strategy: str, reason: str, workers: int) -> None:
        """Record the strategy actually used (after a fallback, say)."""
        with self._lock:
            self.strategy, self.reason, self.workers = strategy, reason, workers

    def emit(self, kind: str, **payload: Any) -> None:
        """Send one event to the executor's telemetry sink."""
        if self._emit is not None:
            self._emit({"event": kind, "run_id": self.run_id, **payload})

    def wants_events(self) -> bool:
        """Return True if someone listens (a callback, or DEBUG logging)."""
        return self._emit is not None and (
            self._wants_events is None or self._wants_events()
        )

    def finish(self, status: str) -> RunSummary:
        """Freeze the counters into a ``RunSummary`` (idempotent)."""
        with self._lock:
            if self.summary is not None:
                return self.summary
            wall_s = time.perf_counter() - self._started
            counts = self._counts
            workers = max(1, self.workers)
            utilisation = (
                counts["compute_s"] / (wall_s * workers) if wall_s > 0 else 0.0
            )
            self.summary = RunSummary(
                run_id=self.run_id,
                strategy=self.strategy,
                reason=self.reason,
                workers=self.workers,
                start_method=self.start_method,
                chunks=int(counts["chunks"]),
                items=int(counts["items"]),
                wall_s=wall_s,
                compute_s=counts["compute_s"],
                queue_wait_s=counts["queue_wait_s"],
                dispatch_overhead_s=counts["dispatch_overhead_s"],
                utilisation=min(1.0, utilisation),
                bytes_pickled=int(counts["bytes_pickled"]),
                bytes_shared=int(counts["bytes_shared"]),
                fallbacks=tuple(self._fallbacks),
                failures=int(counts["failures"]),
                cancellations=int(counts["cancellations"]),
                worker_restarts=int(counts["worker_restarts"]),
                nested=self.nested,
                thread_cap=self.thread_cap,
                status=status,
            )
        if self.wants_events():
            self.emit("run_finished", summary=self.summary.as_dict())
        return self.summary


_AGGREGATED_COUNTS: Final = (
    "chunks",
    "items",
    "wall_s",
    "compute_s",
    "queue_wait_s",
    "dispatch_overhead_s",
    "bytes_pickled",
    "bytes_shared",
    "failures",
    "cancellations",
    "worker_restarts",
)


@final
@dataclass
class Telemetry:
    """An executor's telemetry: run summaries, events and export.

    Parameters
    ----------
    callback : callable or None
        Receives every event dict; an exception it raises is logged and
        swallowed so telemetry never breaks a run.
    """

    callback: Callable[[dict[str, Any]], None] | None = None
    runs: list[RunSummary] = field(default_factory=list)
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    keep_runs: int = KEEP_RUNS
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Over every run, including those no longer kept in ``runs``.
    _totals: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(_AGGREGATED_COUNTS, 0), repr=False
    )
    _run_count: int = field(default=0, repr=False)
    _capacity_s: float = field(default=0.0, repr=False)
    _nested: bool = field(default=False, repr=False)
    _fallback_count: int = field(default=0, repr=False)

    def note_fallback(self, reason: str, **detail: Any) -> None:
        """Record work that ran outside any run, other than asked (any thread).

        Integrations use it when they hand a request back to the explainer's
        own code path; ``summary()["fallbacks"]`` lists it with the runs'.
        """
        event = {"reason": reason, **detail}
        with self._lock:
            self.fallbacks.append(event)
            self._fallback_count += 1
            if len(self.fallbacks) > self.keep_runs:
                del self.fallbacks[0]
        self.emit({"event": "fallback", "run_id": None, **event})

    def emit(self, event: dict[str, Any]) -> None:
        """Log ``event`` at DEBUG and pass it to the callback."""
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("engine event %s", event)
        if self.callback is None:
            return
        try:
            self.callback(event)
        except Exception:  # a user's callback must not break the run
            logger.exception("telemetry callback %r failed", self.callback)

    def wants_events(self) -> bool:
        """Return True if events have a listener (callback or DEBUG log)."""
        return self.callback is not None or logger.isEnabledFor(logging.DEBUG)

    def recorder(self, **kwargs: Any) -> RunRecorder:
        """Start a ``RunRecorder`` wired to this sink."""
        recorder = RunRecorder(emit=self.emit, wants_events=self.wants_events, **kwargs)
        if self.wants_events():
            recorder.emit(
                "run_started",
                strategy=recorder.strategy,
                reason=recorder.reason,
                workers=recorder.workers,
            )
        return recorder

    def add_caller_run(self, reason: str, items: int, wall_s: float) -> RunSummary:
        """Record a run done in one loop in the caller (auto's tiny maps).

        The summary and events a ``recorder`` would give, without the
        recorder: a map of a few milliseconds pays for every object made.
        """
        summary = RunSummary.__new__(RunSummary)
        # The frozen __init__ sets 22 fields one object.__setattr__ at a time;
        # after a map's items (cold caches) that cost W6 ~40 us. Same fields,
        # same values (tests/unit/test_telemetry.py compares the two).
        summary.__dict__.update(
            _CALLER_RUN,
            run_id=next(_run_ids),
            reason=reason,
            items=items,
            wall_s=wall_s,
            compute_s=wall_s,
            utilisation=1.0 if wall_s > 0 else 0.0,
        )
        if self.wants_events():
            run = {"run_id": summary.run_id}
            started = {"strategy": "serial", "reason": reason, "workers": 1}
            self.emit({"event": "run_started", **run, **started})
            self.emit({"event": "run_finished", **run, "summary": summary.as_dict()})
        self.add(summary)
        return summary

    def add(self, summary: RunSummary) -> None:
        """Count a finished run; keep its summary among the last ``keep_runs``.

        A warm executor can run maps for the life of a service (the
        calibrated-explanations plugin: one per ``explain_factual``): the
        totals cover every run, the per-run list only the most recent.
        """
        with self._lock:
            self._run_count += 1
            for name in _AGGREGATED_COUNTS:
                self._totals[name] += getattr(summary, name)
            self._capacity_s += summary.wall_s * max(1, summary.workers)
            self._nested = self._nested or summary.nested
            self._fallback_count += len(summary.fallbacks)
            self.runs.append(summary)
            if len(self.runs) > self.keep_runs:
                del self.runs[0]

    def summary(self) -> dict[str, Any]:
        """Return totals over all runs plus the last run's fields, as a dict.

        The top level carries the last run's ``strategy``, ``reason``,
        ``workers`` and ``start_method``, ``run_count``, the sums of the
        counters and ``utilisation`` over all runs, ``fallback_count``, and
        ``runs`` and ``fallbacks``: the dicts of the last ``keep_runs`` runs
        and the fallbacks they and the integrations recorded (at most
        ``keep_runs`` of the latter).
        """
        with self._lock:
            runs = list(self.runs)
            totals = dict(self._totals)
            capacity = self._capacity_s
            outside = [dict(item) for item in self.fallbacks]
            out: dict[str, Any] = {
                "schema_version": SCHEMA_VERSION,
                "run_count": self._run_count,
                "strategy": runs[-1].strategy if runs else None,
                "reason": runs[-1].reason if runs else None,
                "workers": runs[-1].workers if runs else 0,
                "start_method": runs[-1].start_method if runs else None,
                "nested": self._nested,
                "fallback_count": self._fallback_count,
            }
        for name in _AGGREGATED_COUNTS:
            out[name] = totals[name]
        out["utilisation"] = (
            min(1.0, out["compute_s"] / capacity) if capacity > 0 else 0.0
        )
        out["fallbacks"] = [
            dict(item) for run in runs for item in run.fallbacks
        ] + outside
        out["runs"] = [run.as_dict() for run in runs]
        return out

    def to_json(self, **kwargs: Any) -> str:
        """Return ``summary()`` as JSON text."""
        return json.dumps(self.summary(), **kwargs)
