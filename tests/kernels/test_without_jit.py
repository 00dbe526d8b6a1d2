"""The kernel suite also passes with numba's JIT disabled (plain Python cores)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import kernels

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.mark.skipif(not kernels.is_jit_enabled(), reason="already running without JIT")
def test_kernel_suite_passes_under_numba_disable_jit() -> None:
    env = dict(os.environ)
    env["NUMBA_DISABLE_JIT"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), env.get("PYTHONPATH")])
    )
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(HERE),
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        "--deselect",
        f"{HERE / Path(__file__).name}::test_kernel_suite_passes_under_numba_disable_jit",
    ]
    done = subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout


def test_jit_flag_reflects_numba_config() -> None:
    import numba

    assert kernels.is_jit_enabled() is (not numba.config.DISABLE_JIT)
