"""Recording and reading process heartbeats.

The database is the one mechanism that exists in every mode (SQLite embedded, Postgres in production), so
liveness lives there, next to the jobs the processes serve. A heartbeat is a plain upsert of one row; a
cleanly stopped process deletes its row, a dead one leaves it to age. ``/readyz`` turns the rows into ages:
the maintenance process (reaper, webhook relay, sweeps) must be fresh for the API to be ready, job workers
are reported but do not gate readiness — the API still accepts jobs while no worker runs, and they wait
in the queue as they would behind a busy worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.db import utcnow
from app.heartbeats.models import WorkerHeartbeat

ROLE_JOBS = "jobs"
ROLE_MAINTENANCE = "maintenance"
FORGET_AFTER = timedelta(days=1)
"""Rows of processes gone this long are deleted (by the maintenance heartbeat) rather than reported."""


def record_heartbeat(
    session: Session, *, hostname: str, role: str, queues: list[str], pid: int, started_at: datetime
) -> None:
    """Say this process is alive now (insert its row, or refresh it)."""
    now = utcnow()
    values = {"role": role, "queues": sorted(queues), "pid": pid, "started_at": started_at, "last_seen": now}
    refreshed = session.execute(update(WorkerHeartbeat).where(WorkerHeartbeat.hostname == hostname).values(**values))
    if refreshed.rowcount == 0:  # type: ignore[attr-defined]  # CursorResult
        # Node names are unique among live workers, so no other process inserts this row concurrently.
        session.add(WorkerHeartbeat(hostname=hostname, **values))
    if role == ROLE_MAINTENANCE:
        session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.last_seen < now - FORGET_AFTER))


def forget(session: Session, hostname: str) -> None:
    """A process that stops cleanly removes its row: it is gone, not dead."""
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.hostname == hostname))


@dataclass(frozen=True)
class ProcessLiveness:
    role: str
    queues: list[str]
    last_seen_s: float
    alive: bool


def liveness(session: Session, stale_after_s: float) -> list[ProcessLiveness]:
    """Every known process with the age of its last heartbeat, freshest first."""
    now = utcnow()
    rows = session.scalars(select(WorkerHeartbeat).order_by(WorkerHeartbeat.last_seen.desc())).all()
    result = []
    for row in rows:
        age = max((now - row.last_seen).total_seconds(), 0.0)
        result.append(ProcessLiveness(row.role, list(row.queues), round(age, 1), age <= stale_after_s))
    return result
