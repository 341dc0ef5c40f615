"""Job metrics and job log lines, derived from the job events in one place.

Every state change of a job writes a job event in the same transaction (``app.jobs.lifecycle``), in
whichever process makes it: the API (``job.queued``, cancellations), a worker (``job.started``, the
steps, the final status) or the maintenance worker (``job.retrying``, a lost worker's failure). This
listener turns each event into its metrics and one log line, and sets the log context (job, attempt,
step) of the code that follows. Metrics and lines are emitted only once the transaction commits, so a
rolled-back transition counts nothing.
"""

from __future__ import annotations

import logging
import resource
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import get_settings
from app.jobs.models import Job, JobEvent
from app.observability import context, tracing
from app.observability import metrics as m

log = logging.getLogger("modelpress.jobs")

_PENDING = "modelpress_observability_pending"
# job.progress is frequent and says nothing the gauges need (set_progress sets those directly).
_QUIET = {"job.progress"}


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max((end - start).total_seconds(), 0.0)


def _after_commit(session: Session, action: Callable[[], None]) -> None:
    session.info.setdefault(_PENDING, []).append(action)


@sa_event.listens_for(Session, "after_commit")
def _run_pending(session: Session) -> None:
    for action in session.info.pop(_PENDING, []):
        try:
            action()
        except Exception:  # observability never breaks the work it observes
            log.warning("could not record a job metric", exc_info=True)


@sa_event.listens_for(Session, "after_rollback")
def _drop_pending(session: Session) -> None:
    session.info.pop(_PENDING, None)


def observe_job_event(session: Session, event: JobEvent) -> None:
    """Called by :func:`app.jobs.lifecycle.record_event` for every job event: metrics, log line, log context."""
    if event.type in _QUIET:
        return
    row = session.execute(
        select(
            Job.queue, Job.steps, Job.created_at, Job.started_at, Job.finished_at, Job.attempts, Job.worker_id,
            Job.error_type,
        ).where(Job.id == event.job_id)
    ).one_or_none()  # fmt: skip
    if row is None:
        return
    queue, steps, created_at, started_at, finished_at, attempts, worker_id, error_type = row
    methods = m.methods_label(str(s.get("method", "?")) for s in steps or [])
    data = event.data or {}
    kind = event.type
    fields: dict[str, Any] = {"job_id": event.job_id, "tenant_id": event.tenant_id, "event": kind}
    actions: list[Callable[[], None]] = []

    if kind == "job.queued":
        context.job_id.set(event.job_id)
        actions.append(lambda: m.JOBS_CREATED.labels(queue, methods).inc())
    elif kind == "job.started":
        context.job_id.set(event.job_id)
        context.tenant_id.set(event.tenant_id)
        context.attempt.set(attempts)
        fields["attempt"] = attempts
        tracing.annotate(job_id=event.job_id, attempt=attempts)
        actions.append(lambda: m.JOBS_STARTED.labels(queue, "true" if attempts > 1 else "false").inc())
        wait = _seconds(created_at, started_at)
        if attempts == 1 and wait is not None:
            actions.append(lambda: m.JOB_QUEUE_WAIT.labels(queue, methods).observe(wait))
    elif kind.startswith("job.step."):
        index = int(data.get("step", -1))
        method = str(steps[index].get("method", "?")) if 0 <= index < len(steps or []) else "?"
        status = kind.removeprefix("job.step.")
        worker = m.worker_label(worker_id)
        fields["step"] = f"{index}:{method}"
        if status == "running":
            context.step.set(f"{index}:{method}")
            tracing.start_step(event.job_id, index, method)
            actions.append(lambda: m.WORKER_STEP.labels(worker, method).set(1))
        else:
            context.step.set(None)
            tracing.end_step(event.job_id, status)
            duration = data.get("duration_s")
            actions.append(lambda: _step_ended(worker, method, status, duration))
    elif kind in ("job.succeeded", "job.failed", "job.cancelled"):
        status = kind.removeprefix("job.")
        error = (error_type or "") if status == "failed" else ""
        run_time = _seconds(started_at, finished_at)
        if error:
            fields["error_type"] = error
        actions.append(lambda: m.JOBS_FINISHED.labels(queue, methods, status, error).inc())
        if run_time is not None:
            actions.append(lambda: m.JOB_RUN_TIME.labels(methods, status).observe(run_time))
        if status == "succeeded" and worker_id:
            actions.append(lambda: m.WORKER_PROGRESS.labels(m.worker_label(worker_id)).set(1.0))
        if kind == "job.cancelled" and started_at is None:  # cancelled while queued
            actions.append(lambda: m.JOB_CANCEL_REQUESTS.labels("queued").inc())
    elif kind == "job.cancelling":
        actions.append(lambda: m.JOB_CANCEL_REQUESTS.labels("running").inc())
    elif kind == "job.retrying":
        fields["attempt"] = attempts
        actions.append(lambda: m.JOB_RETRIES.labels(queue).inc())

    def emit() -> None:
        if get_settings().metrics_enabled:
            for action in actions:
                action()
        log.info("%s %s", event.job_id, kind, extra=fields)

    _after_commit(session, emit)


def _step_ended(worker: str, method: str, status: str, duration: Any) -> None:
    if isinstance(duration, int | float):
        m.STEP_DURATION.labels(method, status).observe(float(duration))
    m.WORKER_STEP.labels(worker, method).set(0)
    # ru_maxrss is in KiB on Linux: the process's peak so far (pool children are recycled every few tasks).
    m.WORKER_PEAK_RSS.labels(worker).set(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    torch = sys.modules.get("torch")  # never imported here: only read when the engines loaded it
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        m.WORKER_CUDA_PEAK.labels(worker).set(torch.cuda.max_memory_allocated())


def heartbeat(worker_id: str, ok: bool) -> None:
    """A lease heartbeat happened: its time, or a lost lease."""
    if not get_settings().metrics_enabled:
        return
    if ok:
        import time

        m.WORKER_HEARTBEAT.labels(m.worker_label(worker_id)).set(time.time())
    else:
        m.LEASES_LOST.labels(m.worker_label(worker_id)).inc()


def progress(worker_id: str, fraction: float) -> None:
    """The worker's job moved on."""
    if get_settings().metrics_enabled:
        m.WORKER_PROGRESS.labels(m.worker_label(worker_id)).set(min(max(fraction, 0.0), 1.0))
