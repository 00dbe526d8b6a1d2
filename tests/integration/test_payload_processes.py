"""Payloads across processes: fork and spawn children, crashes, exit output.

Each scenario of tests/_payload_tasks.py runs in its own interpreter started
here, so the test sees everything printed until that interpreter and its
resource tracker have exited: a clean run prints nothing on stderr (no
"leaked shared_memory" warning, no KeyError traceback; gh-82300). Plain
``multiprocessing`` children stand in for the engine's workers until the
process strategy exists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
SHM_DIR = Path("/dev/shm")
METHODS = ["fork", "spawn"]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="checks /dev/shm and /proc"
)


def run_scenario(
    name: str, method: str = "fork", *, prefix: tuple[str, ...] = ()
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run one scenario; return the finished process and its JSON result."""
    paths = [str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    code = "import _payload_tasks as t; t.main()"
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", code, name, method],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {}
    return proc, result


def assert_clean(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", f"printed at exit:\n{proc.stderr}"


@pytest.mark.parametrize("method", METHODS)
def test_normal_close_leaves_nothing_and_prints_nothing(method: str) -> None:
    proc, result = run_scenario("close", method)
    assert_clean(proc)
    assert result["reply"] == [result["expected"], {"weights": [1, 2, 3]}]
    assert result["exitcode"] == 0
    assert len(result["names"]) == 2
    assert result["left"] == []


@pytest.mark.parametrize("method", METHODS)
def test_worker_view_points_into_the_segment(method: str) -> None:
    proc, result = run_scenario("zero_copy_live", method)
    assert_clean(proc)
    assert result["in_segment"] is True  # its address lies in the /dev/shm mapping
    assert result["same_object"] is True
    assert result["shares_second_attach"] is True
    assert (result["writeable"], result["write"], result["flag"]) == (
        False,
        "ValueError",
        "ValueError",
    )
    assert result["first"] == 0.0
    assert result["after_owner_write"] == 42.0  # no copy: sees the owner's write
    assert result["left"] == []


@pytest.mark.parametrize("method", METHODS)
def test_every_dtype_arrives_bit_for_bit(method: str) -> None:
    proc, result = run_scenario("dtypes", method)
    assert_clean(proc)
    assert result["ref_mismatches"] == []
    assert result["dumps_mismatches"] == []
    assert result["readonly"] is True
    assert result["kinds"]["object"] == "object"
    assert {k for k, v in result["kinds"].items() if v == "object"} == {"object"}
    assert result["left"] == []


@pytest.mark.parametrize("method", METHODS)
def test_a_shared_object_is_unpickled_once_per_worker(method: str) -> None:
    proc, result = run_scenario("unpickle_once", method)
    assert_clean(proc)
    for reply in result["replies"]:
        assert reply["unpickles"] == 1
        assert reply["same"] is True
        assert reply["results"] == [45.0, 90.0, 135.0]
    assert result["parent_unpickles"] == 0
    assert max(result["blob_sizes"]) < 1024
    assert result["left"] == []


@pytest.mark.parametrize("method", METHODS)
def test_a_sigkilled_attacher_leaves_the_segment_to_its_owner(method: str) -> None:
    proc, result = run_scenario("sigkill", method)
    assert_clean(proc)
    assert result["first"] == result["second"] == 499500.0
    assert result["killed_exitcode"] == -9
    assert len(result["survived"]) == 1  # not unlinked under the owner
    assert result["left"] == []


def test_a_child_forked_before_the_tracker_ran_does_not_unlink() -> None:
    # SHM-NOTES P2: such a child would start a private tracker on attach
    # and unlink the owner's segment when it exits.
    proc, result = run_scenario("fork_before_tracker", "fork")
    assert_clean(proc)
    assert result["first"] == result["second"] == 4950.0
    assert len(result["survived"]) == 1
    assert result["left"] == []


@pytest.mark.parametrize("method", METHODS)
def test_unlink_segment_by_name_from_another_process(method: str) -> None:
    # The supervisor's crash net: it shares the owner's tracker, so the
    # owner's registration goes with the unlink and nothing is printed.
    proc, result = run_scenario("unlink_by_name", method)
    assert_clean(proc)
    assert result["reply"] == [True, False]
    assert result["left"] == []


@pytest.mark.parametrize("scenario", ["exception", "keyboard_interrupt"])
def test_an_error_in_the_with_block_unlinks(scenario: str) -> None:
    proc, result = run_scenario(scenario, "fork")
    assert_clean(proc)
    assert result.get("caught") == "boom" or result.get("interrupted") is True
    assert result["names"]
    assert result["left"] == []


def test_an_unclosed_store_is_unlinked_at_exit_without_warnings() -> None:
    proc, result = run_scenario("uncaught", "spawn")
    assert proc.returncode == 1
    assert "RuntimeError: uncaught on purpose" in proc.stderr
    for noise in ("resource_tracker", "leaked", "KeyError", "Exception ignored"):
        assert noise not in proc.stderr
    assert result["names"]
    assert not any((SHM_DIR / name).exists() for name in result["names"])


def test_a_killed_owner_is_cleaned_by_its_tracker() -> None:
    # The crash net: the owner's tracker registration (SHM-NOTES P6), with
    # no other process keeping that tracker alive.
    proc, result = run_scenario("owner_killed")
    assert proc.returncode == -9
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if not any((SHM_DIR / name).exists() for name in result["names"]):
            break
        time.sleep(0.05)
    assert not any((SHM_DIR / name).exists() for name in result["names"])


def test_a_forked_child_resets_caches_and_owns_nothing() -> None:
    proc, result = run_scenario("fork_reset", "fork")
    assert_clean(proc)
    assert result["owned"] == []  # the parent's segments are not the child's
    assert (result["cache_len"], result["cache_has_k"]) == (0, False)
    assert result["callable_reset"] == ["reset"]
    assert result["attach_sum"] == result["local_sum"] == 1225.0
    assert result["own_pid_ok"] is True
    assert result["own_gone"] is True  # the child's own store did unlink its own
    assert result["parent_left_after_child"] == result["names"]  # ... only
    assert result["parent_cache_len"] == 1
    assert result["parent_resets"] == []
    assert result["left"] == []


def _can_mount_private_tmpfs() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_private_tmpfs(), reason="needs root and unshare -m")
def test_a_full_dev_shm_raises_payload_error_not_sigbus() -> None:
    # FAULTS.md #15, for real: an 8 MiB tmpfs on /dev/shm in a private mount
    # namespace, and a 16 MiB array.
    script = 'mount -t tmpfs -o size=8m tmpfs /dev/shm && exec "$0" "$@"'
    proc, result = run_scenario(
        "no_space", prefix=("unshare", "-m", "sh", "-c", script)
    )
    assert_clean(proc)  # exit code 0: no SIGBUS
    assert result["small_ok"] is True
    for label in ("share", "dumps", "fallocate"):
        message = result[label]
        assert message.startswith("cannot place 16.0 MiB (16777216 bytes)"), message
        assert "free" in message
        assert "shm_threshold=" in message
        assert "--shm-size" in message
    assert "7.0 MiB" in result["share"]  # the real free space, 1 MiB in use
    assert len(result["owned"]) == 1  # only the 1 MiB segment that fitted
    assert result["left"] == []
