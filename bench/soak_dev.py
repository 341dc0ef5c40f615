"""Soak ``modelpress dev``: a tiny job every 30 s for N minutes, and every process must stay up.

Starts ``modelpress dev`` (embedded mode: SQLite, local storage, the file-system broker) on a free port
with a fresh data directory, then every ``--interval`` seconds submits a tiny quantization job (a
2-layer Llama built from a config, uploaded through the Python client) and checks, every few seconds:

- ``modelpress dev`` and its two children (job worker, maintenance) are alive, with the pids they
  started with: a restart by the supervisor is counted and reported, it is not hidden;
- ``/readyz`` answers 200 (database, broker, storage, and a fresh maintenance heartbeat).

At the end it waits for the submitted jobs to finish, stops ``modelpress dev`` with SIGTERM and prints a
JSON summary (jobs by status, job durations, readiness failures, child restarts, processes left behind).
Exit status 0 only when every job succeeded, no child died and /readyz never failed.

    python -m bench.soak_dev [--minutes 30] [--interval 30] [--check-every 5] [--drain-minutes 10] [--data-dir DIR]

It is a benchmark, not a test: it takes as long as you ask. The log of ``modelpress dev`` is written to
``DATA_DIR/dev.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

from app.cli import DEV_KEY
from modelpress import ModelPress

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {"succeeded", "failed", "cancelled"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(log: Path) -> dict[str, list[int]]:
    """Every pid each supervised child has had, from the supervisor's log lines."""
    found: dict[str, list[int]] = {}
    for name, pid in re.findall(r"started (\w+) \(pid (\d+)\)", log.read_text(errors="replace")):
        found.setdefault(name, []).append(int(pid))
    return found


def _ready(base: str) -> tuple[bool, str]:
    try:
        response = httpx.get(f"{base}/readyz", timeout=10)
    except httpx.HTTPError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return response.status_code == 200, "" if response.status_code == 200 else response.text[:500]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between job submissions")
    parser.add_argument("--check-every", type=float, default=5.0, help="seconds between liveness checks")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a fresh temporary directory")
    parser.add_argument(
        "--drain-minutes", type=float, default=10.0, help="how long to wait for the submitted jobs after the soak"
    )
    args = parser.parse_args()

    from tests.helpers import start_dev
    from tests.tiny import sample_text, write_model_dir  # the repo's tiny-model builder (no downloads)

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="modelpress-soak-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    model_dir = write_model_dir(data_dir / "tiny-model")
    eval_file = data_dir / "eval.txt"
    eval_file.write_text(sample_text(4))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = data_dir / "dev.log"
    dev = start_dev(data_dir, port, log)
    print(f"modelpress dev (pid {dev.pid}) on {base}; data in {data_dir}", flush=True)
    started = time.monotonic()
    try:
        deadline = started + 180
        while not _ready(base)[0]:
            if dev.poll() is not None or time.monotonic() > deadline:
                print(log.read_text()[-4000:], file=sys.stderr)
                raise SystemExit("modelpress dev did not become ready")
            time.sleep(1)
        first = _children(log)
        print(f"ready after {time.monotonic() - started:.1f} s; children {first}", flush=True)
        summary = _soak(args, base, dev, log, model_dir, eval_file)
    finally:
        if dev.poll() is None:
            dev.send_signal(signal.SIGTERM)
            try:
                dev.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(dev.pid, signal.SIGKILL)
                dev.wait()
    pids = [pid for pids in _children(log).values() for pid in pids]
    summary["dev_exit_code"] = dev.returncode
    summary["left_behind"] = [pid for pid in pids if psutil.pid_exists(pid)]
    summary["load_average"] = os.getloadavg()
    print(json.dumps(summary, indent=2))
    healthy = (
        summary["jobs"] == {"succeeded": summary["submitted"]}
        and not summary["restarts"]
        and not summary["readiness_failures"]
        and not summary["left_behind"]
        and dev.returncode == 0
    )
    return 0 if healthy else 1


def _soak(
    args: argparse.Namespace, base: str, dev: subprocess.Popen[bytes], log: Path, model_dir: Path, eval_file: Path
) -> dict[str, Any]:
    client = ModelPress(api_key=DEV_KEY, base_url=base)
    model = client.uploads.source(model_dir)
    evaluation = client.uploads.source(eval_file)
    job_ids: list[str] = []
    readiness_failures: list[dict[str, Any]] = []
    checks = 0
    began = time.monotonic()
    end = began + args.minutes * 60
    next_job = began
    while time.monotonic() < end:
        if dev.poll() is not None:
            raise SystemExit(f"modelpress dev exited with {dev.returncode}\n{log.read_text()[-4000:]}")
        if time.monotonic() >= next_job:
            job = client.jobs.create(
                model=model,
                steps=[{"method": "quantize", "scheme": "w8a16", "algorithm": "rtn"}],
                evaluation=evaluation,
                evaluation_options={"seq_len": 64},
                metadata={"suite": "soak"},
            )
            job_ids.append(job.id)
            next_job += args.interval
        ok, detail = _ready(base)
        checks += 1
        if not ok:
            readiness_failures.append(
                {"at_s": round(args.minutes * 60 - (end - time.monotonic()), 1), "detail": detail}
            )
        dead = [pid for pids in _children(log).values() for pid in pids[-1:] if not psutil.pid_exists(pid)]
        if dead:
            print(f"children not running: {dead}", flush=True)
        time.sleep(args.check_every)
    # The last jobs were submitted just now, and on a loaded machine one worker may have fallen behind a job
    # every 30 s: let the queue drain (jobs still queued or running at the end are reported as such).
    drain_deadline = time.monotonic() + args.drain_minutes * 60
    while time.monotonic() < drain_deadline:
        statuses = [client.jobs.get(job_id).status for job_id in job_ids]
        if all(status in TERMINAL for status in statuses):
            break
        time.sleep(2)
    jobs = [client.jobs.get(job_id) for job_id in job_ids]
    durations = [
        (job.finished_at - job.started_at).total_seconds() for job in jobs if job.finished_at and job.started_at
    ]
    children = _children(log)
    return {
        "minutes": args.minutes,
        "interval_s": args.interval,
        "submitted": len(job_ids),
        "jobs": dict(Counter(str(job.status) for job in jobs)),
        "job_seconds": {
            "median": round(statistics.median(durations), 1) if durations else None,
            "max": round(max(durations), 1) if durations else None,
        },
        "readiness_checks": checks,
        "readiness_failures": readiness_failures,
        "children": children,
        "restarts": {name: len(pids) - 1 for name, pids in children.items() if len(pids) > 1},
    }


if __name__ == "__main__":
    raise SystemExit(main())
