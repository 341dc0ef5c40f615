"""A small process supervisor for ``modelpress dev``: keep every child running, stop them all together.

A child that exits while the supervisor runs is started again after a back-off (1 s, doubling up to
30 s; back to 1 s once a child stayed up a minute), with a log line saying which, how it ended and when it
comes back. Children run in process groups of their own: a Ctrl-C in the terminal reaches only
``modelpress dev``, which then stops them in order (SIGTERM to each group, SIGKILL after a grace period)
instead of racing the supervisor to restart them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

log = logging.getLogger("modelpress.dev")

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
"""A child that ran this long before exiting is restarted after the shortest back-off again."""


@dataclass
class Child:
    name: str
    argv: Sequence[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = BACKOFF_START_S
    restart_at: float | None = None
    pids: list[int] = field(default_factory=list)  # every pid this child has had, first to last


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


class Supervisor:
    """Start the children, watch them from a thread, restart the dead, stop everything on :meth:`stop`."""

    def __init__(self, children: dict[str, Sequence[str]], *, poll_s: float = 0.5, grace_s: float = 20.0) -> None:
        self.children = [Child(name, argv) for name, argv in children.items()]
        self.poll_s = poll_s
        self.grace_s = grace_s
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="modelpress-supervisor", daemon=True)

    def start(self) -> None:
        with self._lock:
            for child in self.children:
                self._spawn(child)
        self._thread.start()

    def _spawn(self, child: Child) -> None:
        child.process = subprocess.Popen(child.argv, process_group=0)
        child.started_at = time.monotonic()
        child.restart_at = None
        child.pids.append(child.process.pid)
        log.info("started %s (pid %d)", child.name, child.process.pid)

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            with self._lock:
                if self._stopping.is_set():
                    return
                now = time.monotonic()
                for child in self.children:
                    self._check(child, now)

    def _check(self, child: Child, now: float) -> None:
        assert child.process is not None
        if child.restart_at is not None:
            if now >= child.restart_at:
                child.restarts += 1
                self._spawn(child)
            return
        returncode = child.process.poll()
        if returncode is None:
            return
        _signal_group(child.process, signal.SIGKILL)  # orphans of a dead worker (its pool) go with it
        if now - child.started_at >= STABLE_AFTER_S:
            child.backoff_s = BACKOFF_START_S
        log.warning(
            "%s (pid %d) %s; restarting it in %.0f s",
            child.name,
            child.process.pid,
            describe_exit(returncode),
            child.backoff_s,
        )
        child.restart_at = now + child.backoff_s
        child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)

    def stop(self) -> None:
        """Stop watching, then SIGTERM every child's process group and wait; SIGKILL what outlives the grace."""
        self._stopping.set()
        with self._lock:
            running = [c.process for c in self.children if c.process is not None and c.process.poll() is None]
            for process in running:
                _signal_group(process, signal.SIGTERM)
            deadline = time.monotonic() + self.grace_s
            for process in running:
                try:
                    process.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    log.warning("pid %d did not stop within %.0f s; killing it", process.pid, self.grace_s)
                    _signal_group(process, signal.SIGKILL)
                    process.wait()
                # A Celery worker's pool children are in its group; none may outlive it.
                _signal_group(process, signal.SIGKILL)
        if self._thread.is_alive():
            self._thread.join(timeout=self.poll_s * 4)


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
