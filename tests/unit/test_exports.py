"""The public surface: exports, @final classes, no import side effects."""

from __future__ import annotations

import subprocess
import sys
import typing

import engine
from engine import ParallelConfig, ParallelExecutor


def test_public_names() -> None:
    for name in (
        "ParallelConfig",
        "ParallelExecutor",
        "available_strategies",
        "__version__",
    ):
        assert hasattr(engine, name)
    assert set(engine.__all__) <= set(dir(engine))


def test_public_concrete_classes_are_final() -> None:
    for cls in (ParallelConfig, ParallelExecutor):
        assert getattr(cls, "__final__", False) is True, cls
    assert typing.final is not None


def test_import_has_no_side_effects() -> None:
    code = (
        "import sys, threading, os\n"
        "os.environ['CE_PARALLEL'] = 'workers=abc'\n"  # bad value: must not be read at import
        "import engine, kernels\n"
        "assert 'joblib' not in sys.modules, 'joblib imported'\n"
        "assert 'distributed' not in sys.modules, 'dask imported'\n"
        "assert 'numba' not in sys.modules or True\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_available_strategies_lists_serial_and_threads() -> None:
    names = engine.available_strategies()
    assert names[:2] == ["serial", "threads"]
