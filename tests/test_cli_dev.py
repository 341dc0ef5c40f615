"""``modelpress dev`` supervises its workers: a dead one comes back, and SIGTERM stops every one of them."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.helpers import free_port, start_dev, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[1]


def _until(what: str, check: Callable[[], Any], timeout: float, log: Path) -> Any:
    return wait_until(
        check,
        timeout,
        what,
        interval=0.3,
        ignoring=(httpx.HTTPError, sqlite3.Error),
        detail=lambda: log.read_text()[-4000:],
    )


def _started(log: Path, name: str) -> list[int]:
    return [int(pid) for pid in re.findall(rf"started {name} \(pid (\d+)\)", log.read_text())]


def _maintenance_pid_in_heartbeat(db: Path) -> int | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT pid FROM worker_heartbeats WHERE role = 'maintenance'").fetchone()
    return int(row[0]) if row else None


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    port = free_port()
    log = tmp_path / "dev.log"
    liveness = {"MODELPRESS_LIVENESS_INTERVAL_S": "0.5", "MODELPRESS_LIVENESS_STALE_S": "10"}
    proc = start_dev(tmp_path, port, log, liveness)
    try:
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for name in ("worker", "maintenance"):  # never leave a child behind, even when the test failed
            for pid in _started(log, name):
                if psutil.pid_exists(pid):
                    os.killpg(pid, signal.SIGKILL)


def test_dev_restarts_a_dead_child_and_sigterm_stops_them_all(
    dev: tuple[subprocess.Popen[bytes], str, Path], tmp_path: Path
) -> None:
    proc, base, log = dev
    db = tmp_path / "var" / "modelpress.db"

    def ready() -> bool:
        return httpx.get(f"{base}/readyz", timeout=5).status_code == 200

    _until("/readyz to say ready", ready, timeout=120, log=log)
    [worker] = _started(log, "worker")
    [maintenance] = _started(log, "maintenance")
    assert _until("the maintenance heartbeat", lambda: _maintenance_pid_in_heartbeat(db), 30, log) == maintenance

    os.kill(maintenance, signal.SIGKILL)
    restarted = _until("a new maintenance process", lambda: _started(log, "maintenance")[1:], timeout=60, log=log)
    assert restarted[0] != maintenance and psutil.pid_exists(restarted[0])
    assert f"maintenance (pid {maintenance}) killed by SIGKILL; restarting it in 1 s" in log.read_text()
    # The new process beats (its pid in the heartbeat row) and the API is ready with it.
    _until("the new maintenance heartbeat", lambda: _maintenance_pid_in_heartbeat(db) == restarted[0], 60, log)
    assert ready()
    assert _started(log, "worker") == [worker]  # the others were left alone

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()[-4000:]
    survivors = [pid for pid in (worker, restarted[0]) if psutil.pid_exists(pid)]
    assert survivors == []
    # Nothing of the workers' process groups either (a prefork worker's pool children): killed with the group,
    # they may take a moment to go, and a zombie waiting for init to reap it is gone for every purpose.
    _until("the workers' process groups to be gone", lambda: not _group_members(worker, restarted[0]), 10, log)
    with sqlite3.connect(db) as conn:  # stopped cleanly: gone, not reported dead
        assert conn.execute("SELECT count(*) FROM worker_heartbeats").fetchone() == (0,)


def _group_members(*groups: int) -> list[int]:
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) in groups and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except ProcessLookupError:
            continue
    return members
