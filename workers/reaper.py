"""The reaper: nothing stays ``running`` after its worker died, nothing stays ``queued`` unnoticed."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select

from app.auth.quotas import tenant_priority
from app.broker import enqueue_job
from app.config import get_settings
from app.db import session_scope, utcnow
from app.jobs import lifecycle
from app.jobs.models import HOLDS_WORKER, Job, JobStatus

log = logging.getLogger("modelpress.reaper")


class DatabaseSight:
    """How long this process has reached the database without a gap.

    A lease that ran out while the database was unreachable says nothing about its worker: the worker could
    not renew it either. So the reaper judges leases only once it has itself reached the database, pass
    after pass, for a whole lease period: by then a live worker has renewed its lease (it beats every
    ``heartbeat_s``), and a dead one's job is re-queued. Without this, the first pass after an outage longer
    than the lease re-queued every running job, counted the attempt against ``max_attempts``, and let a
    second worker start the job while the first still ran it. A lease that ran out before the sight began is
    the outage's too: its worker may have given up waiting to record the outage itself, so the job is
    re-queued as an outage's (``infra_retries``), not as a lost worker's (``attempts``). A gap is a pass that
    failed, or none for longer than ``max_gap_s`` (the process was stopped or starved)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since: float | None = None
        self._last: float | None = None
        self._lock = threading.Lock()  # the maintenance worker runs its tasks on two threads

    def reached(self, max_gap_s: float) -> None:
        """Record a pass that reached the database."""
        now = self._clock()
        with self._lock:
            if self._last is None or now - self._last > max_gap_s:
                self._since = now
            self._last = now

    def unbroken_s(self, max_gap_s: float) -> float:
        """Seconds of database access without a gap, up to now (0 when the last pass is too long ago)."""
        now = self._clock()
        with self._lock:
            if self._since is None or self._last is None or now - self._last > max_gap_s:
                return 0.0
            return now - self._since


SIGHT = DatabaseSight()


def reap_once(sight: DatabaseSight | None = None) -> dict[str, int]:
    settings = get_settings()
    sight = sight or SIGHT
    max_gap_s = max(3 * settings.reaper_interval_s, settings.heartbeat_s)
    unbroken_s = sight.unbroken_s(max_gap_s)
    judge_leases = unbroken_s >= settings.lease_s
    now = utcnow()
    # Since when this process has reached the database without a gap: a lease that ran out before then ran
    # out in an outage (or before this process started), when its worker could not write either.
    seen_since = now - timedelta(seconds=unbroken_s)
    requeued: list[tuple[str, str, int]] = []  # job, queue, its tenant's priority
    counts = {"requeued": 0, "failed_or_cancelled": 0, "resent": 0}
    with session_scope() as session:
        # Until this process has seen the database for a lease period, an expired lease may be the outage's.
        expired = (
            session.execute(
                select(Job)
                .where(Job.status.in_(HOLDS_WORKER), Job.lease_expires_at < now)
                .with_for_update(skip_locked=True)
                .limit(100)
            ).scalars()
            if judge_leases
            else ()
        )
        for job in list(expired):
            outage = job.lease_expires_at is not None and job.lease_expires_at < seen_since
            if lifecycle.requeue_after_lost_worker(
                session,
                job,
                now,
                max_attempts=settings.max_attempts,
                max_infra_retries=settings.max_infra_retries,
                outage=outage,
            ):
                requeued.append((job.id, job.queue, tenant_priority(session, job.tenant_id, settings)))
                counts["requeued"] += 1
            else:
                counts["failed_or_cancelled"] += 1
        # Queued for long with no worker claiming: the doorbell may have been lost; ring again.
        stale_before = now - timedelta(seconds=settings.requeue_stale_queued_s)
        stale = session.execute(
            select(Job.id, Job.queue, Job.tenant_id)
            .where(Job.status == JobStatus.QUEUED, Job.updated_at < stale_before)
            .limit(100)
        ).all()
        for job_id, queue, tenant_id in stale:
            if not lifecycle.mark_rung(session, job_id):
                continue  # claimed or cancelled meanwhile
            requeued.append((job_id, queue, tenant_priority(session, tenant_id, settings)))
            counts["resent"] += 1
    sight.reached(max_gap_s)
    # After commit; the message keeps the tenant's priority. With the broker down, the first failure
    # stops the round (each try waits for a connection) and every job not rung is marked so the next
    # pass, seconds later, rings it again.
    unrung = [job_id for job_id, _, _ in requeued]
    for job_id, queue, priority in requeued:
        if not enqueue_job(job_id, queue, priority=priority):
            break
        unrung.remove(job_id)
    if unrung:
        with session_scope() as session:
            for job_id in unrung:
                lifecycle.mark_unrung(session, job_id)
        counts["unrung"] = len(unrung)
    if any(counts.values()):
        log.info("reaper: %s", counts)
    return counts
