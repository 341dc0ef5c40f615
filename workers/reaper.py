"""The reaper: nothing stays ``running`` after its worker died, nothing stays ``queued`` unnoticed."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select

from app.auth.quotas import tenant_priority
from app.broker import enqueue_job
from app.config import get_settings
from app.db import session_scope, utcnow
from app.jobs import lifecycle
from app.jobs.models import HOLDS_WORKER, Job, JobStatus

log = logging.getLogger("modelpress.reaper")


def reap_once() -> dict[str, int]:
    settings = get_settings()
    now = utcnow()
    requeued: list[tuple[str, str, int]] = []  # job, queue, its tenant's priority
    counts = {"requeued": 0, "failed_or_cancelled": 0, "resent": 0}
    with session_scope() as session:
        expired = session.execute(
            select(Job)
            .where(Job.status.in_(HOLDS_WORKER), Job.lease_expires_at < now)
            .with_for_update(skip_locked=True)
            .limit(100)
        ).scalars()
        for job in list(expired):
            if lifecycle.requeue_after_lost_worker(session, job, settings.max_attempts, now):
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
