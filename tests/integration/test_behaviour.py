"""The behavioural suite every strategy must pass, with serial as the oracle.

Parametrised over ``strategy_fields`` (tests/conftest.py): serial, threads,
processes under fork and spawn, joblib and dask, each skipped only when it is
unavailable here.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

import numpy as np
import pytest
from _tasks import (
    TaskError,
    add,
    fail_on,
    identity,
    nested_map,
    shuffled_sleep,
    sleep_s,
    square,
)

from engine import (
    CancelledError,
    ConfigError,
    ExecutorStateError,
    ParallelConfig,
    ParallelExecutor,
    RunTimeoutError,
)


def _executor(fields: dict[str, Any], **more: Any) -> ParallelExecutor:
    return ParallelExecutor(ParallelConfig(**{"min_batch_size": 1, **fields, **more}))


def test_map_equals_serial(strategy_fields: dict[str, Any]) -> None:
    with _executor(strategy_fields) as ex:
        assert ex.map(square, range(1000)) == [square(i) for i in range(1000)]


@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_order_kept_under_shuffled_completion(
    strategy_fields: dict[str, Any], chunk_size: int | None
) -> None:
    fn = functools.partial(shuffled_sleep, seed=3)
    expected = [fn(i) for i in range(60)]
    with _executor(strategy_fields) as ex:
        assert ex.map(fn, range(60), chunk_size=chunk_size) == expected


def test_extra_args_and_iterators(strategy_fields: dict[str, Any]) -> None:
    with _executor(strategy_fields) as ex:
        assert ex.map(add, (i for i in range(50)), 100) == [i + 100 for i in range(50)]
        assert ex.map(square, []) == []
        assert ex.map(identity, ["a", None, (1, 2)]) == ["a", None, (1, 2)]


def test_imap_streams_in_order(strategy_fields: dict[str, Any]) -> None:
    with _executor(strategy_fields) as ex:
        stream = ex.imap(square, iter(range(100)), chunk_size=4)
        first = [next(stream) for _ in range(5)]
        assert first == [0, 1, 4, 9, 16]
        assert list(stream) == [square(i) for i in range(5, 100)]


def test_imap_closed_early_leaves_executor_usable(
    strategy_fields: dict[str, Any],
) -> None:
    with _executor(strategy_fields) as ex:
        stream = ex.imap(square, range(200), chunk_size=2)
        assert next(stream) == 0
        stream.close()
        assert ex.map(square, range(20)) == [square(i) for i in range(20)]


def test_exception_keeps_its_type_and_pool_stays_usable(
    strategy_fields: dict[str, Any],
) -> None:
    with _executor(strategy_fields) as ex:
        with pytest.raises(TaskError, match="item 13 is bad"):
            ex.map(fail_on, range(40), chunk_size=3)
        assert ex.map(square, range(30)) == [square(i) for i in range(30)]
        runs = ex.telemetry.summary()["runs"]
        assert runs[0]["status"] == "error"
        assert runs[1]["status"] == "ok"


def test_cancel_from_another_thread(strategy_fields: dict[str, Any]) -> None:
    fn = functools.partial(sleep_s, seconds=0.05)
    with _executor(strategy_fields, cancel_grace_s=0.5) as ex:
        timer = threading.Timer(0.3, ex.cancel)
        started = time.monotonic()
        timer.start()
        try:
            with pytest.raises(CancelledError):
                ex.map(fn, range(400), chunk_size=2)
        finally:
            timer.cancel()
        assert time.monotonic() - started < 0.3 + max(1.0, 0.5) + 1.0
        assert ex.telemetry.summary()["cancellations"] == 1
        assert ex.map(square, range(10)) == [square(i) for i in range(10)]


def test_timeout_names_the_limit(strategy_fields: dict[str, Any]) -> None:
    fn = functools.partial(sleep_s, seconds=0.05)
    with _executor(strategy_fields, timeout_s=0.3, cancel_grace_s=0.2) as ex:
        started = time.monotonic()
        with pytest.raises(RunTimeoutError, match=r"timeout_s=0\.3"):
            ex.map(fn, range(400), chunk_size=2)
        assert time.monotonic() - started < 0.3 + 2.0
        assert ex.telemetry.summary()["runs"][-1]["status"] == "timeout"


def test_gating_runs_small_batches_serially(strategy_fields: dict[str, Any]) -> None:
    with ParallelExecutor(
        ParallelConfig(**{**strategy_fields, "min_batch_size": 10})
    ) as ex:
        assert ex.map(square, range(5)) == [0, 1, 4, 9, 16]
        run = ex.telemetry.summary()["runs"][-1]
        assert run["strategy"] == "serial"
        if strategy_fields["strategy"] != "serial":
            assert "min_batch_size=10" in run["reason"]


def test_telemetry_reports_the_run(strategy_fields: dict[str, Any]) -> None:
    with _executor(strategy_fields) as ex:
        ex.map(square, range(100), chunk_size=10)
        summary = ex.telemetry.summary()
    assert summary["strategy"] == strategy_fields["strategy"]
    assert summary["workers"] == strategy_fields.get("max_workers", 1)
    assert summary["chunks"] == 10
    assert summary["items"] == 100
    assert summary["wall_s"] > 0
    assert 0.0 <= summary["utilisation"] <= 1.0
    assert summary["runs"][0]["status"] == "ok"


def test_nested_executor_runs_serially(strategy_fields: dict[str, Any]) -> None:
    inner = {"strategy": "threads", "max_workers": 2, "min_batch_size": 1}
    with _executor(strategy_fields) as ex:
        results = ex.map(nested_map, range(4), inner)
    assert [total for total, _, _ in results] == [
        sum(square(i) for i in range(x + 8)) for x in range(4)
    ]
    if strategy_fields["strategy"] != "serial":
        assert all(strategy == "serial" and nested for _, strategy, nested in results)


def test_shared_array_is_read_only_and_equal(strategy_fields: dict[str, Any]) -> None:
    data = np.arange(300_000, dtype=np.float64)
    with _executor(strategy_fields) as ex:
        handle = ex.share(data)
        sums = ex.map(_sum_and_try_write, range(6), handle)
    assert sums == [(float(data.sum()), True)] * 6


def _sum_and_try_write(_: int, array: np.ndarray) -> tuple[float, bool]:
    try:
        array[0] = -1.0
    except ValueError:
        refused = True
    else:
        refused = False
    return float(array.sum()), refused


def test_off_forces_serial(
    monkeypatch: pytest.MonkeyPatch, strategy_fields: dict[str, Any]
) -> None:
    monkeypatch.setenv("CE_PARALLEL", "off")
    with _executor(strategy_fields) as ex:
        assert ex.map(square, range(50)) == [square(i) for i in range(50)]
        run = ex.telemetry.summary()["runs"][-1]
    assert run["strategy"] == "serial"
    assert run["reason"] == "CE_PARALLEL=off"


def test_off_takes_effect_at_the_next_map(
    monkeypatch: pytest.MonkeyPatch, strategy_fields: dict[str, Any]
) -> None:
    # CE_PARALLEL is read on every map (its answer is cached per value): a
    # warm executor obeys a change at once, in both directions.
    monkeypatch.delenv("CE_PARALLEL", raising=False)
    with _executor(strategy_fields) as ex:
        for value in (None, "off", None, "off"):
            if value is None:
                monkeypatch.delenv("CE_PARALLEL", raising=False)
            else:
                monkeypatch.setenv("CE_PARALLEL", value)
            assert ex.map(square, range(20)) == [square(i) for i in range(20)]
            reason = ex.telemetry.summary()["runs"][-1]["reason"]
            assert (reason == "CE_PARALLEL=off") == (value == "off")
        monkeypatch.setenv("CE_PARALLEL", "of")
        for _ in range(2):
            with pytest.raises(ConfigError, match="token 'of' is invalid"):
                ex.map(square, range(3))


def test_map_after_exit_is_refused(strategy_fields: dict[str, Any]) -> None:
    with _executor(strategy_fields) as ex:
        ex.map(square, range(3))
    with pytest.raises(ExecutorStateError):
        ex.map(square, range(3))


def test_unavailable_strategy_falls_back_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from engine import FallbackWarning, StrategyUnavailableError, strategies

    real = strategies.unavailable_reason
    monkeypatch.setattr(
        strategies,
        "unavailable_reason",
        lambda name: f"{name} broken here" if name == "threads" else real(name),
    )
    with pytest.raises(StrategyUnavailableError, match="threads broken here"):
        ParallelExecutor(ParallelConfig(strategy="threads")).__enter__()
    config = ParallelConfig(
        strategy="threads", force_serial_on_failure=True, min_batch_size=1
    )
    with ParallelExecutor(config) as ex:
        with pytest.warns(FallbackWarning, match="threads broken here"):
            assert ex.map(square, range(20)) == [square(i) for i in range(20)]
        run = ex.telemetry.summary()["runs"][-1]
    assert run["strategy"] == "serial"
    assert run["fallbacks"][0]["requested"] == "threads"


def _raise_timeout(x: int) -> int:
    if x == 5:
        raise TimeoutError("fn's own timeout")
    return x


def test_fn_raising_timeout_error_is_not_mistaken_for_waiting(
    strategy_fields: dict[str, Any],
) -> None:
    with _executor(strategy_fields, timeout_s=30) as ex:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="fn's own timeout"):
            ex.map(_raise_timeout, range(20), chunk_size=2)
        assert time.monotonic() - started < 10
