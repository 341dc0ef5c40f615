"""The job state machine, in one place, shared by the API and the workers.

``queued → running → succeeded | failed | cancelled``, with ``cancelling`` between a running job
and ``cancelled``. Every transition is one guarded ``UPDATE … WHERE status IN (…)``: zero rows
means the caller lost a race (a 409 at the API, a no-op in a worker). Terminal states never change.
Each transition writes its event in the same transaction (the outbox rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, CursorResult, select, update
from sqlalchemy.orm import Session

from app.auth import quotas
from app.config import get_settings
from app.db import utcnow
from app.jobs.models import HOLDS_WORKER, Job, JobEvent, JobStatus
from app.observability import jobs as observe


def json_safe(value: Any) -> Any:
    """``value`` with every NaN/±inf float replaced by ``None``: JSON has no such numbers, Postgres
    rejects them in JSON columns, and an engine's numbers (a diverged loss) can be non-finite."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def record_event(session: Session, job_id: str, tenant_id: str, type_: str, data: dict[str, Any]) -> JobEvent:
    """Append a job event and its webhook deliveries (the outbox) to the caller's transaction; its metrics and
    log line follow the commit. Every transition is counted here, once, by every process."""
    event = JobEvent(job_id=job_id, tenant_id=tenant_id, type=type_, data=json_safe(data))
    session.add(event)
    session.flush()
    # The webhook outbox, in the same transaction: wired here, so no process can forget to register it.
    from app.webhooks.service import enqueue_for_event

    enqueue_for_event(session, event)
    observe.observe_job_event(session, event)
    return event


def _guarded_update(
    session: Session, job_id: str, allowed: tuple[str, ...], extra_where: Any = None, **values: Any
) -> bool:
    stmt = update(Job).where(Job.id == job_id, Job.status.in_(allowed))
    if extra_where is not None:
        stmt = stmt.where(extra_where)
    result = session.execute(stmt.values(updated_at=utcnow(), **values).execution_options(synchronize_session=False))
    assert isinstance(result, CursorResult)
    return result.rowcount == 1


def _tenant_of(session: Session, job_id: str) -> str:
    return session.execute(select(Job.tenant_id).where(Job.id == job_id)).scalar_one()


def _close_running_steps(session: Session, job_id: str, status: str) -> tuple[list[dict[str, Any]], list[int]]:
    """The job's steps with every ``running`` one set to ``status``, and the indexes so closed.

    A job that ends (or loses its worker) while a step runs must not leave that step ``running``: the
    worker that would have closed it may be gone (killed, lease expired) or may have stopped between
    two writes.
    """
    steps = session.execute(select(Job.steps).where(Job.id == job_id)).scalar_one_or_none() or []
    closed: list[int] = []
    result: list[dict[str, Any]] = []
    now = utcnow().isoformat()
    for index, step in enumerate(steps):
        entry = dict(step)
        if entry.get("status") == "running":
            entry["status"] = status
            if status == "pending":  # re-queued: the next attempt runs it again from the start
                entry.pop("started_at", None)
            else:
                entry["finished_at"] = now
            closed.append(index)
        result.append(entry)
    return result, closed


def _record_closed_steps(session: Session, job_id: str, tenant_id: str, status: str, closed: list[int]) -> None:
    for index in closed:
        record_event(session, job_id, tenant_id, f"job.step.{status}", {"step": index})


def claim(session: Session, job_id: str, worker_id: str, lease_s: int) -> bool:
    """``queued → running`` for this worker, with a lease. False if someone else has it or it was cancelled,
    and also while the job's tenant already runs as many jobs as its quota allows (the job then stays
    queued; see :func:`app.auth.quotas.deferred_job`)."""
    now = utcnow()
    tenant_id = session.execute(select(Job.tenant_id).where(Job.id == job_id)).scalar_one_or_none()
    if tenant_id is None:
        return False
    ok = _guarded_update(
        session,
        job_id,
        (JobStatus.QUEUED,),
        # The running-jobs quota is checked here, where jobs start, atomically with the transition.
        quotas.running_slot_free(session, tenant_id, get_settings()),
        status=JobStatus.RUNNING,
        worker_id=worker_id,
        lease_expires_at=now + timedelta(seconds=lease_s),
        started_at=now,
        attempts=Job.attempts + 1,
        progress=0.0,
        progress_message="started",
    )
    if ok:
        attempts = session.execute(select(Job.attempts).where(Job.id == job_id)).scalar_one()
        record_event(session, job_id, tenant_id, "job.started", {"worker": worker_id, "attempt": attempts})
    return ok


def heartbeat(session: Session, job_id: str, worker_id: str, lease_s: int) -> str | None:
    """Extend the lease; return the job's status (e.g. ``cancelling``), or None if this worker lost it."""
    ok = _guarded_update(
        session,
        job_id,
        HOLDS_WORKER,
        Job.worker_id == worker_id,
        lease_expires_at=utcnow() + timedelta(seconds=lease_s),
    )
    observe.heartbeat(worker_id, ok)
    if not ok:
        return None
    return session.execute(select(Job.status).where(Job.id == job_id)).scalar_one()


def set_progress(
    session: Session, job_id: str, worker_id: str, fraction: float, message: str, data: dict[str, Any] | None = None
) -> bool:
    ok = _guarded_update(
        session,
        job_id,
        HOLDS_WORKER,
        Job.worker_id == worker_id,
        progress=round(min(max(fraction, 0.0), 1.0), 4),
        progress_message=message[:500],
    )
    if ok:
        observe.progress(worker_id, fraction)
        payload = {"progress": round(fraction, 4), "message": message, **(data or {})}
        record_event(session, job_id, _tenant_of(session, job_id), "job.progress", payload)
    return ok


def mark_rung(session: Session, job_id: str) -> bool:
    """A doorbell for this queued job is on its way (a refused claim re-rings it after a delay): the job
    counts as fresh, so the reaper, which re-sends only jobs nobody rang for a while, adds no second
    doorbell loop. Not a transition, and no event."""
    return _guarded_update(session, job_id, (JobStatus.QUEUED,))


# ``updated_at`` of a queued job whose doorbell could not be sent (the broker was down). Far older than
# ``requeue_stale_queued_s``, so the reaper's next pass (every ``reaper_interval_s``, a few seconds)
# re-sends it as soon as the broker answers, instead of after the stale-queue delay meant for lost messages.
NEVER_RUNG = datetime(2000, 1, 1, tzinfo=UTC)


def mark_unrung(session: Session, job_id: str) -> bool:
    """No doorbell reached the broker for this queued job: let the reaper ring it on its next pass.
    Not a transition, and no event."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(updated_at=NEVER_RUNG)
        .execution_options(synchronize_session=False)
    )
    assert isinstance(result, CursorResult)
    return result.rowcount == 1


def set_steps(session: Session, job_id: str, worker_id: str, steps: list[dict[str, Any]]) -> bool:
    return _guarded_update(session, job_id, HOLDS_WORKER, Job.worker_id == worker_id, steps=json_safe(steps))


def succeed(
    session: Session, job_id: str, worker_id: str, manifest_key: str, summary: dict[str, Any], data: dict[str, Any]
) -> bool:
    ok = _guarded_update(
        session,
        job_id,
        (JobStatus.RUNNING,),
        Job.worker_id == worker_id,
        status=JobStatus.SUCCEEDED,
        progress=1.0,
        progress_message="done",
        manifest_key=manifest_key,
        summary=json_safe(summary),
        finished_at=utcnow(),
        lease_expires_at=None,
    )
    if ok:
        record_event(session, job_id, _tenant_of(session, job_id), "job.succeeded", {"summary": summary, **data})
    return ok


def _end_unfinished(
    session: Session,
    job_id: str,
    sources: tuple[JobStatus, ...],
    worker_id: str | None,
    status: JobStatus,
    event: dict[str, Any],
    **values: Any,
) -> bool:
    """``sources → status`` (failed or cancelled), closing a step still ``running`` with the same word, then
    the steps' events and the job's (``job.<status>`` with ``event``)."""
    steps, closed = _close_running_steps(session, job_id, status.value)
    ok = _guarded_update(
        session,
        job_id,
        sources,
        (Job.worker_id == worker_id) if worker_id else None,
        status=status,
        finished_at=utcnow(),
        lease_expires_at=None,
        steps=json_safe(steps),
        progress_message=status.value,
        **values,
    )
    if ok:
        tenant_id = _tenant_of(session, job_id)
        _record_closed_steps(session, job_id, tenant_id, status.value, closed)
        record_event(session, job_id, tenant_id, f"job.{status.value}", event)
    return ok


def fail(session: Session, job_id: str, error_type: str, message: str, worker_id: str | None = None) -> bool:
    """``running/cancelling/queued → failed`` with a readable reason (worker_id None: the reaper); a step
    still ``running`` becomes ``failed``."""
    reason = message[:4000]
    return _end_unfinished(
        session,
        job_id,
        (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING),
        worker_id,
        JobStatus.FAILED,
        {"error": {"type": error_type, "message": reason}},
        error_type=error_type,
        error_message=reason,
    )


def mark_cancelled(session: Session, job_id: str, worker_id: str | None = None) -> bool:
    """``cancelling → cancelled`` (the worker stopped, or the reaper found it gone); a step still ``running``
    becomes ``cancelled``."""
    return _end_unfinished(session, job_id, (JobStatus.CANCELLING,), worker_id, JobStatus.CANCELLED, {})


def request_cancel(session: Session, job_id: str) -> str | None:
    """Queued jobs stop at once; running ones move to ``cancelling``. Returns the new status or None (too late)."""
    tenant = _tenant_of(session, job_id)
    if _guarded_update(
        session,
        job_id,
        (JobStatus.QUEUED,),
        status=JobStatus.CANCELLED,
        finished_at=utcnow(),
        progress_message="cancelled",
    ):
        record_event(session, job_id, tenant, "job.cancelled", {})
        return JobStatus.CANCELLED
    if _guarded_update(session, job_id, (JobStatus.RUNNING,), status=JobStatus.CANCELLING):
        record_event(session, job_id, tenant, "job.cancelling", {})
        return JobStatus.CANCELLING
    status = session.execute(select(Job.status).where(Job.id == job_id)).scalar_one()
    return JobStatus.CANCELLING if status == JobStatus.CANCELLING else None


def requeue_after_lost_worker(
    session: Session, job: Job, now: datetime, *, max_attempts: int, max_infra_retries: int, outage: bool
) -> bool:
    """The reaper's rule for a job whose lease expired: retry (bounded) or fail; cancelling → cancelled.

    ``outage``: the lease ran out while the database was unreachable (the reaper could not reach it either),
    so its worker may well have given up waiting to record the outage itself: the attempt is the outage's,
    re-queued as :func:`release_for_retry` would have, not counted against ``max_attempts``."""
    if job.status == JobStatus.CANCELLING:
        mark_cancelled(session, job.id)
        return False
    expired = Job.lease_expires_at < now
    if outage:
        held = _Held(job.id, job.tenant_id, job.infra_retries)
        return _requeue_for_outage(session, held, "database", max_infra_retries, expired, worker_id=None)
    # Attempts released after an outage are not the user's: they do not count (see release_for_retry).
    counted = job.attempts - job.infra_retries
    if counted >= max_attempts:
        fail(
            session,
            job.id,
            "worker_lost",
            f"the worker stopped responding (lease expired) on attempt {counted} of {max_attempts}; giving up",
        )
        return False
    return _requeue(
        session,
        _Held(job.id, job.tenant_id, job.infra_retries),
        expired,
        "re-queued after a lost worker",
        {"reason": "worker lost (lease expired)", "attempt": job.attempts, "max_attempts": max_attempts},
    )


def release_for_retry(
    session: Session, job_id: str, worker_id: str, dependency: str, max_infra_retries: int
) -> int | None:
    """The worker's attempt met an outage (``dependency``: database, broker or storage): ``running → queued``,
    to be retried once the dependency answers. Such attempts are nobody's fault, so they do not count
    against ``max_attempts``; ``infra_retries`` counts them instead, and past ``max_infra_retries`` the job
    fails (``infrastructure_unavailable``) rather than loop forever. A job being cancelled becomes
    ``cancelled``.

    Returns the job's new ``infra_retries`` when it was re-queued (the caller rings again, with back-off),
    None otherwise (cancelled, failed, or the job is no longer this worker's).
    """
    job = session.execute(
        select(Job.id, Job.status, Job.infra_retries, Job.tenant_id).where(Job.id == job_id, Job.worker_id == worker_id)
    ).one_or_none()
    if job is None:
        return None
    if job.status == JobStatus.CANCELLING:
        mark_cancelled(session, job_id, worker_id)
        return None
    held = _Held(job.id, job.tenant_id, job.infra_retries)
    mine = Job.worker_id == worker_id
    if not _requeue_for_outage(session, held, dependency, max_infra_retries, mine, worker_id=worker_id):
        return None
    return job.infra_retries + 1


@dataclass(frozen=True)
class _Held:
    """The columns of a held job that re-queueing it needs (after an outage or a lost worker)."""

    id: str
    tenant_id: str
    infra_retries: int


def _requeue_for_outage(
    session: Session,
    job: _Held,
    dependency: str,
    max_infra_retries: int,
    guard: ColumnElement[bool],
    *,
    worker_id: str | None,
) -> bool:
    """``running → queued`` after an outage (``guard``: the row is still the caller's to re-queue), counted in
    ``infra_retries``; past ``max_infra_retries`` the job fails ``infrastructure_unavailable``."""
    job_id, infra_retries = job.id, job.infra_retries
    if infra_retries >= max_infra_retries:
        fail(
            session,
            job_id,
            "infrastructure_unavailable",
            f"the service's {dependency} was unreachable; the job was retried {infra_retries} times after outages "
            "and then given up. Submit it again.",
            worker_id,
        )
        return False
    return _requeue(
        session,
        job,
        guard,
        f"waiting: the {dependency} was unreachable; retrying",
        {"reason": f"{dependency} unavailable", "infrastructure": True, "infra_retries": infra_retries + 1},
        infra_retries=Job.infra_retries + 1,
    )


def _requeue(
    session: Session,
    job: _Held,
    guard: ColumnElement[bool],
    message: str,
    event: dict[str, Any],
    **values: Any,
) -> bool:
    """``running → queued`` while ``guard`` holds: its running steps back to pending, the lease dropped, a
    ``job.retrying`` event carrying ``event``; ``values`` are further columns to set. False if the row had
    moved on."""
    steps, _ = _close_running_steps(session, job.id, "pending")
    ok = _guarded_update(
        session,
        job.id,
        (JobStatus.RUNNING,),
        guard,
        status=JobStatus.QUEUED,
        worker_id=None,
        lease_expires_at=None,
        progress=0.0,
        progress_message=message,
        steps=json_safe(steps),
        **values,
    )
    if ok:
        record_event(session, job.id, job.tenant_id, "job.retrying", event)
    return ok
