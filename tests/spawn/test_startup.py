"""Start-up: start methods, unguarded main modules, workers that cannot start.

FAULTS.md #21: a worker that cannot start is an error naming the cause and
the remedy; under ``force_serial_on_failure`` (or auto) the run is serial
with a ``FallbackWarning``. Each provoked for real in a caller subprocess.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _crash_tasks import exit_on, identity, pid_after, start_methods

from engine import ParallelConfig, ParallelExecutor, WorkerCrashedError

pytestmark = pytest.mark.spawn

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"


def _run(
    script: str, *args: str, extra_path: str | None = None
) -> subprocess.CompletedProcess[str]:
    entries = [str(ROOT), str(TESTS)] + ([extra_path] if extra_path else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(entries)}
    env.pop("CE_PARALLEL", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.mark.skipif(
    "forkserver" not in multiprocessing.get_all_start_methods(), reason="no forkserver"
)
def test_forkserver_maps_and_heals() -> None:
    config = ParallelConfig(
        strategy="processes", max_workers=2, start_method="forkserver", min_batch_size=1
    )
    with ParallelExecutor(config) as ex:
        assert ex.map(identity, range(50), chunk_size=3) == list(range(50))
        with pytest.raises(WorkerCrashedError, match="exit code 7"):
            ex.map(exit_on, range(8), chunk_size=1)
        assert len(set(ex.map(pid_after, range(8), chunk_size=1))) >= 1
        assert ex.telemetry.summary()["start_method"] == "forkserver"


UNGUARDED = """
import sys
from engine import ParallelConfig, ParallelExecutor

def triple(x):
    return 3 * x

# No `if __name__ == "__main__":` guard: the engine never re-imports the
# caller's main module in its supervisor or workers, so this just works.
with ParallelExecutor(ParallelConfig(strategy="processes", max_workers=2,
                                     start_method=sys.argv[1], min_batch_size=1)) as ex:
    print(ex.map(triple, range(6)))
"""


@pytest.mark.parametrize("start_method", start_methods())
def test_unguarded_main_module_works(start_method: str) -> None:
    done = _run(UNGUARDED, start_method)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 3, 6, 9, 12, 15]"


BOOTSTRAPPING_CHILD = """
import multiprocessing
from engine import ParallelConfig, ParallelExecutor

def child():
    pass

# Unguarded: multiprocessing's spawn child re-imports this module, which
# creates an executor while the child is still bootstrapping.
with ParallelExecutor(ParallelConfig(strategy="processes", max_workers=1,
                                     min_batch_size=1)) as ex:
    ex.map(abs, [-1, -2])
process = multiprocessing.get_context("spawn").Process(target=child)
process.start()
process.join()
print("child exit code", process.exitcode)
"""


def test_executor_in_a_bootstrapping_spawn_child_names_the_guard(
    tmp_path: Path,
) -> None:
    script = tmp_path / "unguarded_main.py"  # spawn re-imports a main *file*
    script.write_text(textwrap.dedent(BOOTSTRAPPING_CHILD))
    done = _run(f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')")
    assert "child exit code 1" in done.stdout, done.stderr
    assert "StrategyUnavailableError" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr


SITECUSTOMIZE = """
import sys
# Breaks every multiprocessing spawn child at start-up, like a broken site
# installation would; the supervisor itself (python -c) is not affected.
if "--multiprocessing-fork" in sys.argv:
    raise SystemExit(3)
"""

SITECUSTOMIZE_FORK = """
import os
# In the supervisor only: every process it forks (a worker) dies at once.
if "_supervisor_main" in open("/proc/self/cmdline").read():
    os.register_at_fork(after_in_child=lambda: os._exit(3))
"""

BROKEN_WORKERS = """
import sys, warnings
from engine import FallbackWarning, ParallelConfig, ParallelExecutor, StrategyUnavailableError

config = ParallelConfig(strategy="processes", max_workers=2, start_method=START_METHOD,
                        min_batch_size=1)
if __name__ == "__main__":
    try:
        with ParallelExecutor(config) as ex:
            ex.map(abs, [-1])
    except StrategyUnavailableError as exc:
        print("ERROR:", exc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ParallelExecutor(config.replace(force_serial_on_failure=True)) as ex:
            print("RESULT:", ex.map(abs, [-1, -2, -3]))
            print("STRATEGY:", ex.telemetry.summary()["strategy"])
    print("WARNED:", any(issubclass(w.category, FallbackWarning) for w in caught))
"""


@pytest.mark.parametrize(
    ("start_method", "sitecustomize"),
    [
        ("spawn", SITECUSTOMIZE),
        pytest.param(
            "fork",
            SITECUSTOMIZE_FORK,
            marks=pytest.mark.skipif(
                not sys.platform.startswith("linux"), reason="reads /proc"
            ),
        ),
    ],
)
def test_workers_that_cannot_start(
    tmp_path: Path, start_method: str, sitecustomize: str
) -> None:
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(sitecustomize))
    script = BROKEN_WORKERS.replace("START_METHOD", repr(start_method))
    done = _run(script, extra_path=str(tmp_path))
    assert done.returncode == 0, done.stderr
    error = next(line for line in done.stdout.splitlines() if line.startswith("ERROR:"))
    assert "exited before connecting" in error
    assert "exit code" in error
    assert "CE_PARALLEL=off" in error
    assert "RESULT: [1, 2, 3]" in done.stdout
    assert "STRATEGY: serial" in done.stdout
    assert "WARNED: True" in done.stdout


BROKEN_SUPERVISOR = """
import sys
from engine import ParallelConfig, ParallelExecutor, StrategyUnavailableError
try:
    with ParallelExecutor(ParallelConfig(strategy="processes", max_workers=1,
                                         min_batch_size=1)):
        pass
except StrategyUnavailableError as exc:
    print("ERROR:", exc)
"""

SITECUSTOMIZE_SUPERVISOR = """
import sys
if sys.argv[:1] == ["-c"] and "_supervisor_main" in open("/proc/self/cmdline").read():
    raise SystemExit(4)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_supervisor_that_cannot_start(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent(SITECUSTOMIZE_SUPERVISOR)
    )
    done = _run(BROKEN_SUPERVISOR, extra_path=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "ERROR:" in done.stdout
    assert "supervisor process stopped before its workers started" in done.stdout
    assert "CE_PARALLEL=off" in done.stdout
