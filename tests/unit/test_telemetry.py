"""Telemetry schema version 1: recorder, summaries, events, JSON."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading

import pytest

from engine.telemetry import SCHEMA_VERSION, RunSummary, Telemetry

SCHEMA_FIELDS = {
    "schema_version",
    "run_id",
    "strategy",
    "reason",
    "workers",
    "start_method",
    "chunks",
    "items",
    "wall_s",
    "compute_s",
    "queue_wait_s",
    "dispatch_overhead_s",
    "utilisation",
    "bytes_pickled",
    "bytes_shared",
    "fallbacks",
    "failures",
    "cancellations",
    "worker_restarts",
    "nested",
    "thread_cap",
    "status",
}


def test_run_summary_has_every_schema_field() -> None:
    telemetry = Telemetry()
    recorder = telemetry.recorder(strategy="threads", reason="configured", workers=2)
    recorder.add(chunks=2, items=10, compute_s=0.5, bytes_pickled=100)
    recorder.record_fallback("lost chunk 1", chunk=1)
    summary = recorder.finish("ok")
    assert isinstance(summary, RunSummary)
    data = summary.as_dict()
    assert set(data) == SCHEMA_FIELDS
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert data["items"] == 10
    assert data["chunks"] == 2
    assert data["fallbacks"] == [{"reason": "lost chunk 1", "chunk": 1}]
    assert 0.0 <= data["utilisation"] <= 1.0
    json.dumps(data)


def test_finish_is_idempotent() -> None:
    recorder = Telemetry().recorder(strategy="serial", reason="r", workers=1)
    first = recorder.finish("ok")
    assert recorder.finish("error") is first


def test_unknown_counter_is_refused() -> None:
    recorder = Telemetry().recorder(strategy="serial", reason="r", workers=1)
    with pytest.raises(KeyError, match="itemz"):
        recorder.add(itemz=1)


def test_counters_are_thread_safe() -> None:
    recorder = Telemetry().recorder(strategy="threads", reason="r", workers=4)

    def bump() -> None:
        for _ in range(1000):
            recorder.add(items=1)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert recorder.finish("ok").items == 4000


def test_summary_aggregates_runs_and_exports_json() -> None:
    telemetry = Telemetry()
    for items in (3, 4):
        recorder = telemetry.recorder(
            strategy="threads", reason="configured", workers=2
        )
        recorder.add(items=items, chunks=1)
        telemetry.add(recorder.finish("ok"))
    summary = telemetry.summary()
    assert summary["run_count"] == 2
    assert summary["items"] == 7
    assert summary["chunks"] == 2
    assert summary["strategy"] == "threads"
    assert len(summary["runs"]) == 2
    assert json.loads(telemetry.to_json())["items"] == 7


def test_empty_summary_has_fields() -> None:
    summary = Telemetry().summary()
    for name in ("strategy", "workers", "chunks", "items", "wall_s", "utilisation"):
        assert name in summary


def test_callback_receives_events_and_cannot_break_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = []

    def callback(event: dict) -> None:
        events.append(event)
        if event["event"] == "fallback":
            raise RuntimeError("callback bug")

    telemetry = Telemetry(callback=callback)
    recorder = telemetry.recorder(strategy="serial", reason="r", workers=1)
    with caplog.at_level(logging.ERROR, logger="engine"):
        recorder.record_fallback("x")
    recorder.finish("ok")
    kinds = [event["event"] for event in events]
    assert kinds == ["run_started", "fallback", "run_finished"]
    assert "callback bug" in caplog.text


def test_debug_log(caplog: pytest.LogCaptureFixture) -> None:
    telemetry = Telemetry()
    with caplog.at_level(logging.DEBUG, logger="engine"):
        telemetry.recorder(strategy="serial", reason="gated", workers=1).finish("ok")
    assert "run_started" in caplog.text
    assert "gated" in caplog.text


def test_totals_cover_every_run_but_only_the_latest_are_kept() -> None:
    # A warm executor may run maps for a service's lifetime: the summaries
    # kept are bounded, the totals are not truncated.
    telemetry = Telemetry(keep_runs=3)
    for items in range(1, 8):
        recorder = telemetry.recorder(
            strategy="serial", reason=f"run {items}", workers=1
        )
        recorder.add(items=items, chunks=1, compute_s=0.25)
        recorder.record_fallback(f"fallback in run {items}")
        telemetry.add(recorder.finish("ok"))
        telemetry.note_fallback(f"outside run {items}")
    summary = telemetry.summary()
    assert len(telemetry.runs) == 3
    assert [run["reason"] for run in summary["runs"]] == ["run 5", "run 6", "run 7"]
    assert summary["run_count"] == 7
    assert summary["items"] == sum(range(1, 8))
    assert summary["chunks"] == 7
    assert summary["compute_s"] == pytest.approx(7 * 0.25)
    assert summary["reason"] == "run 7"
    assert summary["fallback_count"] == 14
    reasons = [item["reason"] for item in summary["fallbacks"]]
    assert reasons == [
        "fallback in run 5",
        "fallback in run 6",
        "fallback in run 7",
        "outside run 5",
        "outside run 6",
        "outside run 7",
    ]


@pytest.mark.parametrize("with_callback", [False, True])
def test_caller_run_matches_a_recorded_one(with_callback: bool) -> None:
    # auto's tiny maps skip the recorder; their summary (and events, when
    # someone listens) must be what the recorder would have produced.
    events: list[dict[str, object]] = []
    telemetry = Telemetry(callback=events.append if with_callback else None)
    summary = telemetry.add_caller_run("tiny", items=5, wall_s=0.004)
    # Built without __init__: the same attributes __init__ would set.
    assert vars(summary) == vars(dataclasses.replace(summary))
    recorder = Telemetry().recorder(strategy="serial", reason="tiny", workers=1)
    recorder.add(items=5, chunks=1, compute_s=0.004)
    expected = recorder.finish("ok").as_dict()
    got = summary.as_dict()
    for name in ("run_id", "wall_s", "utilisation"):
        got.pop(name)
        expected.pop(name)
    assert got == expected
    assert summary.wall_s == pytest.approx(0.004, abs=0.002)
    assert 0.0 < summary.utilisation <= 1.0
    assert telemetry.runs == [summary]
    assert telemetry.summary()["items"] == 5
    kinds = [event["event"] for event in events]
    assert kinds == (["run_started", "run_finished"] if with_callback else [])
    if with_callback:
        recorded: list[dict[str, object]] = []
        sink = Telemetry(callback=recorded.append)
        other = sink.recorder(strategy="serial", reason="tiny", workers=1)
        other.add(items=5, chunks=1, compute_s=0.004)
        other.finish("ok")
        assert [set(event) for event in events] == [set(event) for event in recorded]
        assert events[0] | {"run_id": 0} == recorded[0] | {"run_id": 0}
        assert events[1]["run_id"] == summary.run_id
        assert events[1]["summary"] == summary.as_dict()
