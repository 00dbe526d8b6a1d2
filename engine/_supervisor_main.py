"""The supervisor process: start, watch, replace and kill workers; clean up.

::

    caller ──(python -c bootstrap, spec on stdin)──▶ supervisor: main(spec)
      ▲                                                 │ thread caps into its own
      │ control socket (authenticated)                  │ environment, shared resource
      │   ◀── ("started", pid) ("died", pid, code)      │ tracker fd, then N workers:
      │   ──▶ ("kill", pid) ("segments", [names])       ▼
      │       ("shutdown",)                          fork / spawn / forkserver
      │                                                 │ (multiprocessing context)
      └─────────── each worker connects back itself ────┘

    loop: wait(control socket + worker sentinels, 0.5 s)
      control EOF or os.getppid() changed  -> the caller died: SIGKILL every
                                              worker, unlink every registered
                                              segment, exit
      a sentinel fired                     -> reap, report ("died", ...),
                                              start a replacement
      ("kill", pid)                        -> SIGKILL it (forced cancel)
      ("shutdown",)                        -> stop replacing, wait briefly
                                              for workers to exit, kill the
                                              rest, exit

The supervisor never touches task data and runs one thread, so forking
workers from it is safe (FAULTS.md #12). It must not import numpy: a library
that starts thread pools at import would make the fork unsafe again, and
forked workers must set their thread caps before numpy is first imported
(FAULTS.md #13). ``engine.__init__`` imports numpy, so the bootstrap
(engine.supervisor) installs the package without running it;
``defer_package_init`` runs it on first use of a public name, which only
ever happens in a worker.
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import time
import types
from typing import Any, Final

from engine import _env
from engine._wire import (
    CONTROL,
    SUPERVISOR_HELLO,
    FrameReader,
    connect,
    send_frame,
)
from engine._worker import WorkerSpec, worker_main

# SUPERVISOR-NOTES.md pitfall 6: an inherited copy of the caller's end of the
# control socket (a fork child of the caller) defeats EOF detection; polling
# os.getppid() as well cleaned up in ~0.7 s. Half a second here.
PARENT_POLL_S: Final = 0.5
# At shutdown idle workers exit on EOF within milliseconds; busy ones have
# already been killed by the caller. Whatever is left after this is killed.
SHUTDOWN_JOIN_S: Final = 1.0
REAP_JOIN_S: Final = 2.0


def defer_package_init(package: types.ModuleType) -> None:
    """Run ``package``'s ``__init__`` on first access to a public name.

    Submodules and private names load without it, so the supervisor imports
    ``engine._worker`` and friends without numpy. A worker that unpickles
    ``from engine import ParallelExecutor`` (a nested executor) gets the
    real package, initialised once, in place.
    """
    spec = package.__spec__
    assert spec is not None
    assert spec.loader is not None
    loader = spec.loader

    def __getattr__(name: str) -> Any:  # noqa: N807 - PEP 562 hook
        is_submodule = importlib.util.find_spec(f"{package.__name__}.{name}")
        if (name.startswith("_") and name not in ("__version__", "__all__")) or (
            is_submodule is not None
        ):
            raise AttributeError(name)  # the import system loads submodules
        del package.__getattr__
        loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = __getattr__  # type: ignore[attr-defined]


def _share_tracker(fd: int | None) -> bool:
    """Adopt the caller's resource tracker (as multiprocessing's spawn does)."""
    if fd is None:
        return False
    from multiprocessing import resource_tracker

    # SHM-NOTES.md P2: fork workers share a tracker only if it runs at fork
    # time; with the caller's fd in place every worker inherits it, and the
    # supervisor never starts a tracker of its own.
    resource_tracker._resource_tracker._fd = fd
    return True


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(spec: dict[str, Any]) -> int:
    """Run the supervisor until the caller shuts it down or dies."""
    package = sys.modules.get("engine")
    if (
        package is not None
        and not hasattr(package, "__getattr__")
        and "__version__" not in vars(package)
    ):
        defer_package_init(package)
    # Ctrl-C reaches the whole process group; the caller handles it and
    # tells us what to do (FAULTS.md #8). SIGTERM still cleans up.
    if hasattr(signal, "SIGINT"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Every worker starts from this environment (fork: inherited; spawn and
    # forkserver: copied at their start), before any of them imports numpy.
    _env.apply_environment(spec["environment"])
    tracker_shared = _share_tracker(spec.get("tracker_fd"))
    supervisor = _Supervisor(spec, tracker_shared=tracker_shared)
    try:
        supervisor.run()
    finally:
        supervisor.close()
    return 0


class _Supervisor:
    """The single-threaded supervisor loop and its bookkeeping."""

    def __init__(self, spec: dict[str, Any], *, tracker_shared: bool) -> None:
        self.spec = spec
        self.caller_pid: int = spec["caller_pid"]
        self.tracker_shared = tracker_shared
        self.context = multiprocessing.get_context(spec["start_method"])
        self.sock = connect(spec["family"], spec["address"], spec["authkey"])
        self.reader = FrameReader()
        self.workers: dict[int, multiprocessing.process.BaseProcess] = {}  # sentinel ->
        self.segments: set[str] = set(spec.get("segments", ()))
        self.shutting_down = False
        self.caller_gone = False
        self.serial = 0
        send_frame(
            self.sock,
            SUPERVISOR_HELLO,
            aux=os.getpid(),
        )

    # -- messages ----------------------------------------------------------------

    def _report(self, *message: Any) -> None:
        import pickle

        try:
            send_frame(self.sock, CONTROL, 0, 0, 0, pickle.dumps(message, protocol=5))
        except OSError:
            self.caller_gone = True

    def _read_control(self) -> None:
        import pickle

        if not self.reader.receive(self.sock):
            self.caller_gone = True  # EOF: the caller process is gone
            return
        while self.reader.frames:
            kind, _, _, _, payload, _ = self.reader.frames.popleft()
            if kind != CONTROL:
                continue
            message = pickle.loads(payload)
            action = message[0]
            if action == "kill":
                self._kill(message[1])
            elif action == "segments":
                self.segments.update(message[1])
            elif action == "shutdown":
                self.shutting_down = True

    # -- workers -----------------------------------------------------------------

    def _start_worker(self) -> None:
        method = self.spec["start_method"]
        worker_spec = WorkerSpec(
            family=self.spec["family"],
            address=self.spec["address"],
            authkey=self.spec["authkey"],
            supervisor_pid=os.getpid(),
            environment=self.spec["environment"],
            # Under fork the worker inherits our control socket; it closes it
            # so that only this process can read the caller's orders.
            close_fds=(self.sock.fileno(),) if method == "fork" else (),
            parent_pid=None if method == "forkserver" else os.getpid(),
        )
        self.serial += 1
        process = self.context.Process(
            target=worker_main, args=(worker_spec,), name=f"engine-worker-{self.serial}"
        )
        process.start()
        self.workers[process.sentinel] = process
        self._report("started", process.pid)

    def _kill(self, pid: int) -> None:
        for process in self.workers.values():
            if process.pid == pid:
                with contextlib.suppress(OSError):
                    process.kill()
                return

    def _reap(self, sentinel: int) -> None:
        process = self.workers.pop(sentinel)
        process.join(REAP_JOIN_S)
        if process.exitcode is None:  # the sentinel fired but it lingers
            with contextlib.suppress(OSError):
                process.kill()
            process.join(REAP_JOIN_S)
        self._report("died", process.pid, process.exitcode)
        with contextlib.suppress(ValueError):
            process.close()
        if not (self.shutting_down or self.caller_gone):
            self._start_worker()  # the pool heals itself (FAULTS.md #1)

    def _kill_all(self) -> None:
        for process in self.workers.values():
            with contextlib.suppress(OSError):
                process.kill()
        for process in self.workers.values():
            process.join(REAP_JOIN_S)
        self.workers.clear()

    # -- the loop ------------------------------------------------------------------

    def run(self) -> None:
        for _ in range(self.spec["workers"]):
            self._start_worker()
        deadline: float | None = None
        wait = multiprocessing.connection.wait
        while not self.caller_gone:
            if self.shutting_down:
                if deadline is None:
                    deadline = time.monotonic() + SHUTDOWN_JOIN_S
                if not self.workers or time.monotonic() >= deadline:
                    return
            ready = wait([self.sock, *self.workers], timeout=PARENT_POLL_S)
            for item in ready:
                if item is self.sock:
                    self._read_control()
                elif item in self.workers:
                    self._reap(item)
            # POSIX: re-parented means the caller died, whatever the socket
            # says (FAULTS.md #7). Windows keeps the old pid: EOF suffices.
            if os.name == "posix" and os.getppid() != self.caller_pid:
                self.caller_gone = True

    def close(self) -> None:
        """Kill what is left; after the caller's death, unlink its segments."""
        if os.name == "posix" and os.getppid() != self.caller_pid:
            self.caller_gone = True
        self._kill_all()
        if self.caller_gone:
            # FAULTS.md #7: the caller cannot unlink any more; we can, because
            # it told us every segment's name as it created it.
            for name in sorted(self.segments):
                self._unlink(name)
            for path in self.spec.get("cleanup_paths", ()):
                shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.sock.close()

    def _unlink(self, name: str) -> None:
        if os.name != "posix":
            return  # Windows: a segment dies with its last handle
        import _posixshmem

        try:
            _posixshmem.shm_unlink("/" + name)
        except OSError:
            return  # already unlinked by the caller, or never created
        if self.tracker_shared:
            from multiprocessing import resource_tracker

            # The caller registered the segment with the shared tracker;
            # unregistering keeps the tracker from a "leaked shared_memory"
            # warning (and a second unlink) when it exits (SHM-NOTES.md P7).
            resource_tracker.unregister("/" + name, "shared_memory")
