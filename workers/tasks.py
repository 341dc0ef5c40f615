"""Thin Celery tasks: each one calls into the runner or the reaper."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from celery import Task
from celery.signals import worker_ready

from app.broker import REAP_TASK, RUN_JOB_TASK, SWEEP_STORAGE_TASK
from app.config import get_settings
from app.uploads.service import EXPIRE_UPLOADS_TASK
from app.webhooks.relay import WEBHOOK_RELAY_TASK
from app.webhooks.service import PRUNE_DELIVERIES_TASK
from workers.celery_app import celery_app
from workers.failures import infrastructure_failure

log = logging.getLogger("modelpress.worker")
P = ParamSpec("P")
R = TypeVar("R")


class MaintenanceSkipped(Exception):  # noqa: N818
    """A periodic task met an outage: this run is skipped and the next one tries again. Celery logs such an
    expected exception (``throws``) as one INFO line, without a traceback."""


# Periodic task -> the dependency it found unreachable, until a run succeeds. The maintenance worker runs its
# tasks on two threads, so a run that began before an outage and ended after another run met it may say "answers
# again" early, and the next failure warns again: a line too many, never a lost one.
_outages: dict[str, str] = {}
_outages_lock = threading.Lock()


def skips_outages(task: Callable[P, R]) -> Callable[P, R]:
    """Run a periodic task; an outage of the database, broker or storage skips the run instead of failing it
    with a traceback (which, at a beat every few seconds, buried the log in a long outage). One warning says
    when a task's outage begins and one when its dependency answers again; anything else still raises."""

    @functools.wraps(task)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        name = task.__name__
        try:
            result = task(*args, **kwargs)
        except Exception as exc:
            dependency = infrastructure_failure(exc)
            if dependency is None:
                raise
            with _outages_lock:
                before, _outages[name] = _outages.get(name), dependency
            if before != dependency:
                reason = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
                log.warning("%s: the %s is unreachable (%s); skipped until it answers", name, dependency, reason)
            raise MaintenanceSkipped(f"the {dependency} is unreachable") from None
        with _outages_lock:
            ended = _outages.pop(name, None)
        if ended is not None:
            log.warning("%s: the %s answers again", name, ended)
        return result

    return run


@celery_app.task(bind=True, name=RUN_JOB_TASK, acks_late=True, max_retries=None)
def run_job(self: Task, job_id: str) -> None:
    """Run one job end to end (claim, fetch, steps, evaluate, upload, finish).

    While the worker's database or storage is down the job is not claimed: the runner holds the message
    (so this worker takes no other) for up to ``dependency_wait_s``, then it goes back to the broker with a
    delay. Between jobs, the scratch directories nobody owns any more are swept.
    """
    from workers.failures import DependenciesUnavailable
    from workers.runner import JobRunner  # torch loads in the worker child, not at import time
    from workers.sweep import sweep_scratch_between_jobs

    sweep_scratch_between_jobs()
    try:
        JobRunner(job_id).run()
    except DependenciesUnavailable as exc:
        log.warning("job %s not claimed (%s); the message goes back to the broker", job_id, exc)
        raise self.retry(exc=exc, countdown=get_settings().infra_retry_backoff_s) from exc
    finally:
        sweep_scratch_between_jobs()


@worker_ready.connect
def sweep_scratch_at_start(**_: object) -> None:
    """A worker starting on a host where another one was killed sweeps what that one left behind.

    This runs in the worker's main process, which forks the job processes: its database connections are
    closed afterwards, so no child inherits one.
    """
    from app.db import reset_caches
    from workers.sweep import sweep_scratch_between_jobs

    try:
        sweep_scratch_between_jobs()
    finally:
        reset_caches()


@celery_app.task(name=SWEEP_STORAGE_TASK, throws=(MaintenanceSkipped,))
@skips_outages
def sweep_storage() -> dict[str, int]:
    """Delete attempt artifacts and checkpoints in the bucket that no live attempt owns."""
    from app.storage import get_storage
    from workers.sweep import sweep_storage as sweep

    result = sweep(get_storage())
    return {"attempts": len(result.attempts), "checkpoints": len(result.checkpoints)}


@celery_app.task(name=REAP_TASK, throws=(MaintenanceSkipped,))
@skips_outages
def reap() -> dict[str, int]:
    """Re-queue or fail jobs whose worker vanished; re-send jobs whose queue message was lost."""
    from workers.reaper import reap_once

    return reap_once()


@celery_app.task(name=WEBHOOK_RELAY_TASK, throws=(MaintenanceSkipped,))
@skips_outages
def deliver_webhooks() -> dict[str, int]:
    """Send due webhook deliveries from the outbox (overlapping runs are safe: claims skip locked rows)."""
    from app.webhooks.relay import run_once

    stats = run_once(budget_s=30.0)
    return {"claimed": stats.claimed, "delivered": stats.delivered, "retrying": stats.retrying, "failed": stats.failed}


@celery_app.task(name=PRUNE_DELIVERIES_TASK, throws=(MaintenanceSkipped,))
@skips_outages
def prune_webhook_deliveries() -> dict[str, int]:
    """Delete finished webhook deliveries older than ``MODELPRESS_WEBHOOK_DELIVERY_RETENTION_DAYS``."""
    from datetime import timedelta

    from app.config import get_settings
    from app.db import session_scope
    from app.webhooks.service import prune_deliveries

    with session_scope() as session:
        days = get_settings().webhook_delivery_retention_days
        return {"deleted": prune_deliveries(session, timedelta(days=days))}


@celery_app.task(name=EXPIRE_UPLOADS_TASK, throws=(MaintenanceSkipped,))
@skips_outages
def expire_uploads() -> dict[str, int]:
    """Delete what was PUT for uploads that expired before they were completed."""
    from app.db import session_scope
    from app.storage import get_storage
    from app.uploads.service import expire_uploads as expire

    with session_scope() as session:
        return {"expired": expire(session, get_storage())}
