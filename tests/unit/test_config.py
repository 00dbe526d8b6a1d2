"""ParallelConfig validation and the CE_PARALLEL grammar."""

from __future__ import annotations

import dataclasses

import pytest

from engine import ConfigError, ParallelConfig
from engine._env import parse_ce_parallel

# (CE_PARALLEL value, expected ParallelConfig fields)
GOOD_CASES = [
    ("", {"strategy": "auto"}),
    ("   ", {"strategy": "auto"}),
    ("off", {"strategy": "serial"}),
    ("0", {"strategy": "serial"}),
    ("false", {"strategy": "serial"}),
    ("no", {"strategy": "serial"}),
    ("disable", {"strategy": "serial"}),
    ("OFF", {"strategy": "serial"}),
    ("off,processes,workers=4", {"strategy": "serial", "max_workers": 4}),
    ("processes,off", {"strategy": "serial"}),
    ("on", {"strategy": "auto"}),
    ("enable,threads", {"strategy": "threads"}),
    ("1,joblib", {"strategy": "joblib"}),
    ("yes,processes", {"strategy": "processes"}),
    ("sequential", {"strategy": "serial"}),
    ("serial", {"strategy": "serial"}),
    (
        "dask,dask=tcp://10.0.0.1:8786",
        {"strategy": "dask", "dask_address": "tcp://10.0.0.1:8786"},
    ),
    ("auto", {"strategy": "auto"}),
    (
        "threads,workers=2,min_batch=4",
        {"strategy": "threads", "max_workers": 2, "min_batch_size": 4},
    ),
    (" processes , workers=3 ", {"strategy": "processes", "max_workers": 3}),
    (
        "instance_chunk=16,feature_chunk=32",
        {"instance_chunk_size": 16, "feature_chunk_size": 32},
    ),
    ("task_bytes=4096", {"task_size_hint_bytes": 4096}),
    ("task_bytes=2k", {"task_size_hint_bytes": 2048}),
    ("force_serial=on", {"force_serial_on_failure": True}),
    ("force_serial=false", {"force_serial_on_failure": False}),
    ("start=spawn", {"start_method": "spawn"}),
    ("start=FORKSERVER", {"start_method": "forkserver"}),
    ("prefer=processes+threads", {"prefer": ("processes", "threads")}),
    ("prefer=sequential", {"prefer": ("serial",)}),
    ("shm_threshold=0", {"shm_threshold_bytes": 0}),
    ("shm_threshold=512k", {"shm_threshold_bytes": 512 * 1024}),
    ("shm_threshold=2M", {"shm_threshold_bytes": 2 * 1024**2}),
    ("shm_threshold=1G", {"shm_threshold_bytes": 1024**3}),
    ("shm_threshold=3MiB", {"shm_threshold_bytes": 3 * 1024**2}),
    ("timeout=2.5", {"timeout_s": 2.5}),
    ("granularity=instance", {"strategy": "auto"}),
    ("min_instances=16", {"min_batch_size": 16}),
    ("tiny=3", {"min_batch_size": 3}),
    ("threads,,workers=2", {"strategy": "threads", "max_workers": 2}),
]

# (CE_PARALLEL value, text the error must contain)
BAD_CASES = [
    ("workers=abc", "workers=abc"),
    ("workers=0", "workers=0"),
    ("workers=-2", "workers=-2"),
    ("thread", "thread"),
    ("instance_chunk_size=5", "instance_chunk_size=5"),
    ("min_batch=", "min_batch="),
    ("min_batch=1.5", "min_batch=1.5"),
    ("force_serial=maybe", "force_serial=maybe"),
    ("start=posix", "start=posix"),
    ("prefer=gpu", "prefer=gpu"),
    ("prefer=auto", "prefer=auto"),
    ("prefer=", "prefer="),
    ("shm_threshold=lots", "shm_threshold=lots"),
    ("timeout=0", "timeout=0"),
    ("timeout=-1", "timeout=-1"),
    ("timeout=inf", "timeout=inf"),
    ("timeout=soon", "timeout=soon"),
    ("dask=", "dask="),
    ("granularity=feature", "granularity=feature"),
    ("processes,colour=blue", "colour=blue"),
    ("task_bytes=-5", "task_bytes=-5"),
    ("feature_chunk=0", "feature_chunk=0"),
]


@pytest.mark.parametrize(("raw", "expected"), GOOD_CASES)
def test_good_ce_parallel_values(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: dict[str, object]
) -> None:
    monkeypatch.setenv("CE_PARALLEL", raw)
    config = ParallelConfig.from_env()
    for name, value in expected.items():
        assert getattr(config, name) == value, name


@pytest.mark.parametrize(("raw", "needle"), BAD_CASES)
def test_bad_ce_parallel_values_name_the_token(
    monkeypatch: pytest.MonkeyPatch, raw: str, needle: str
) -> None:
    monkeypatch.setenv("CE_PARALLEL", raw)
    with pytest.raises(ConfigError) as info:
        ParallelConfig.from_env()
    message = str(info.value)
    assert needle in message
    assert "Accepted forms" in message
    assert isinstance(info.value, ValueError)


def test_env_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CE_PARALLEL", "threads")
    assert ParallelConfig.from_env().strategy == "threads"
    monkeypatch.setenv("CE_PARALLEL", "processes")
    assert ParallelConfig.from_env().strategy == "processes"
    monkeypatch.delenv("CE_PARALLEL")
    assert ParallelConfig.from_env().strategy == "auto"


def test_explicit_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CE_PARALLEL", "threads,workers=4")
    config = ParallelConfig.from_env(max_workers=2)
    assert (config.strategy, config.max_workers) == ("threads", 2)


def test_off_beats_explicit_strategy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CE_PARALLEL", "off")
    assert ParallelConfig.from_env(strategy="processes").strategy == "serial"


def test_from_env_rejects_unknown_override() -> None:
    with pytest.raises(ConfigError, match="workerz"):
        ParallelConfig.from_env(workerz=2)


def test_parse_reports_compat_tokens() -> None:
    settings = parse_ce_parallel("granularity=instance,threads")
    assert settings.ignored_compat == ("granularity=instance",)
    assert settings.overrides == {"strategy": "threads"}


def test_defaults() -> None:
    config = ParallelConfig()
    assert config.strategy == "auto"
    assert config.min_batch_size == 8
    assert config.shm_threshold_bytes == 1024 * 1024
    assert config.prefer == ()


BAD_FIELDS = [
    ("strategy", "thread", "strategy"),
    ("strategy", None, "strategy"),
    ("max_workers", 0, "max_workers"),
    ("max_workers", 2.0, "max_workers"),
    ("max_workers", True, "max_workers"),
    ("start_method", "posix", "start_method"),
    ("min_batch_size", 0, "min_batch_size"),
    ("instance_chunk_size", -1, "instance_chunk_size"),
    ("feature_chunk_size", "8", "feature_chunk_size"),
    ("task_size_hint_bytes", -1, "task_size_hint_bytes"),
    ("shm_threshold_bytes", None, "shm_threshold_bytes"),
    ("force_serial_on_failure", "yes", "force_serial_on_failure"),
    ("cancel_grace_s", -0.5, "cancel_grace_s"),
    ("cancel_grace_s", float("nan"), "cancel_grace_s"),
    ("timeout_s", 0, "timeout_s"),
    ("timeout_s", float("inf"), "timeout_s"),
    ("worker_max_tasks", 0, "worker_max_tasks"),
    ("prefer", "processes", "prefer"),
    ("prefer", ("processes", "gpu"), "prefer"),
    ("prefer", ("threads", "threads"), "prefer"),
    ("prefer", ("auto",), "prefer"),
    ("dask_address", "", "dask_address"),
    ("telemetry", 42, "telemetry"),
]


@pytest.mark.parametrize(("field", "value", "needle"), BAD_FIELDS)
def test_bad_fields_name_field_value_and_allowed(
    field: str, value: object, needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        ParallelConfig(**{field: value})
    message = str(info.value)
    assert needle in message
    assert repr(value) in message
    assert "allowed" in message


def test_config_is_frozen_and_keyword_only() -> None:
    config = ParallelConfig(strategy="threads")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.strategy = "serial"  # type: ignore[misc]
    with pytest.raises(TypeError):
        ParallelConfig("threads")  # type: ignore[misc]


def test_replace_validates() -> None:
    config = ParallelConfig(strategy="threads")
    assert config.replace(max_workers=3).max_workers == 3
    with pytest.raises(ConfigError):
        config.replace(max_workers=0)


def test_as_dict_is_json_friendly() -> None:
    import json

    config = ParallelConfig(prefer=("threads",), telemetry=print)
    data = config.as_dict()
    json.dumps(data)
    assert data["prefer"] == ["threads"]
    assert data["telemetry"] == "print"
