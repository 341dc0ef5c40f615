"""Per-tenant quotas: running jobs, queued jobs, upload bytes per day; and the tenant's priority.

Each limit is the tenant row's override, or the operator default (``quota_*`` settings) when null.
Where each one is enforced, and why there:

- **queued jobs** at ``POST /v1/jobs`` (429): the request that would exceed it is the one to refuse.
- **running jobs** in the worker's claim (:func:`app.jobs.lifecycle.claim`): only a worker knows when a
  job really starts, so the guard lives in the same transaction as ``queued → running``; a job that
  cannot start yet stays queued and is rung again later (runner countdown, then the reaper).
- **upload bytes** at ``POST /v1/uploads`` (429): bytes declared in the last 24 hours, a rolling window,
  so the Retry-After is exact (when enough old uploads age out of the window).

Counting and inserting race between concurrent requests of one tenant, so each check first locks the
tenant row (``SELECT … FOR UPDATE``): requests of one tenant serialise there, other tenants don't wait.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from app.auth.models import Tenant
from app.config import Settings
from app.db import utcnow
from app.errors import Problem
from app.jobs.models import HOLDS_WORKER, Job, JobStatus
from app.uploads.models import Upload

UPLOAD_WINDOW = timedelta(hours=24)


@dataclass(frozen=True)
class Limits:
    """A tenant's effective limits (overrides applied)."""

    max_running_jobs: int
    max_queued_jobs: int
    max_upload_bytes_per_day: int
    requests_per_minute: int
    priority: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def limits_of(tenant: Tenant, settings: Settings) -> Limits:
    def pick(override: int | None, default: int) -> int:
        return default if override is None else override

    return Limits(
        max_running_jobs=pick(tenant.max_running_jobs, settings.quota_running_jobs),
        max_queued_jobs=pick(tenant.max_queued_jobs, settings.quota_queued_jobs),
        max_upload_bytes_per_day=pick(tenant.max_upload_bytes, settings.quota_upload_bytes_per_day),
        requests_per_minute=pick(tenant.rate_limit_per_minute, settings.quota_requests_per_minute),
        priority=pick(tenant.priority, settings.default_priority),
    )


def lock_tenant(session: Session, tenant_id: str) -> Tenant:
    """Lock the tenant row until the transaction ends (serialises this tenant's quota checks)."""
    # NO KEY UPDATE: serialises quota checks without blocking inserts that merely reference the tenant (FKs).
    return session.execute(select(Tenant).where(Tenant.id == tenant_id).with_for_update(key_share=True)).scalar_one()


def too_many(detail: str, retry_after_s: int, **extra: Any) -> Problem:
    """429 problem+json with ``Retry-After`` (seconds)."""
    retry = max(1, int(retry_after_s))
    return Problem(
        429, "Too Many Requests", detail, type_=None, headers={"Retry-After": str(retry)}, retry_after_s=retry, **extra
    )


def count_jobs(session: Session, tenant_id: str, statuses: tuple[str, ...]) -> int:
    return session.execute(
        select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status.in_(statuses))
    ).scalar_one()


def upload_bytes_in_window(session: Session, tenant_id: str) -> int:
    since = utcnow() - UPLOAD_WINDOW
    total = session.execute(
        select(func.coalesce(func.sum(Upload.total_bytes), 0)).where(
            Upload.tenant_id == tenant_id, Upload.created_at > since
        )
    ).scalar_one()
    return int(total)


def usage(session: Session, tenant_id: str) -> dict[str, int]:
    return {
        "running_jobs": count_jobs(session, tenant_id, HOLDS_WORKER),
        "queued_jobs": count_jobs(session, tenant_id, (JobStatus.QUEUED,)),
        "upload_bytes_last_24h": upload_bytes_in_window(session, tenant_id),
    }


def check_queued_quota(session: Session, tenant_id: str, settings: Settings) -> Limits:
    """Before inserting a queued job: 429 if the tenant's queue is full. Locks the tenant row."""
    limits = limits_of(lock_tenant(session, tenant_id), settings)
    queued = count_jobs(session, tenant_id, (JobStatus.QUEUED,))
    if queued >= limits.max_queued_jobs:
        # When a slot frees depends on running jobs we cannot predict; the operator's retry period.
        raise too_many(
            f"{queued} jobs are queued, the limit of this tenant is {limits.max_queued_jobs}; "
            "retry when some have started",
            settings.quota_retry_after_s,
            limit=limits.max_queued_jobs,
        )
    return limits


def check_upload_quota(session: Session, tenant_id: str, new_bytes: int, settings: Settings) -> None:
    """Before inserting an upload: 429 (with the exact wait) if the 24-hour byte budget would be exceeded."""
    limits = limits_of(lock_tenant(session, tenant_id), settings)
    budget = limits.max_upload_bytes_per_day
    if new_bytes > budget:
        raise Problem(413, "Content Too Large", f"upload of {new_bytes} bytes exceeds the daily {budget} bytes")
    now = utcnow()
    recent = session.execute(
        select(Upload.created_at, Upload.total_bytes)
        .where(Upload.tenant_id == tenant_id, Upload.created_at > now - UPLOAD_WINDOW)
        .order_by(Upload.created_at)
    ).all()
    used = sum(size for _, size in recent)
    if used + new_bytes <= budget:
        return
    # The oldest uploads leave the window first: wait until enough of them have.
    for created_at, size in recent:
        used -= size
        if used + new_bytes <= budget:
            wait = (created_at + UPLOAD_WINDOW - now).total_seconds()
            break
    else:  # unreachable: new_bytes <= budget
        wait = UPLOAD_WINDOW.total_seconds()
    raise too_many(
        f"this tenant may upload {budget} bytes per 24 hours; {used} were declared recently",
        math.ceil(wait),
        limit=budget,
    )


def running_slot_free(session: Session, tenant_id: str, settings: Settings) -> ColumnElement[bool]:
    """Lock the tenant and return the claim's guard: "fewer of this tenant's jobs run than its limit".

    The lock makes the count exact: a second worker claiming a job of the same tenant waits for the
    first one's transaction and then counts its job (READ COMMITTED takes a new snapshot per statement).
    """
    limits = limits_of(lock_tenant(session, tenant_id), settings)
    running = (
        select(func.count())
        .select_from(Job)
        .where(Job.tenant_id == tenant_id, Job.status.in_(HOLDS_WORKER))
        .scalar_subquery()
    )
    return running < limits.max_running_jobs


def deferred_job(session: Session, job_id: str, settings: Settings) -> tuple[str, int] | None:
    """For a worker whose claim was refused: ``(queue, priority)`` if the job still waits (its tenant was at its
    running limit) and should be rung again later; None if someone else took it or it ended."""
    row = session.execute(
        select(Job.status, Job.queue, Tenant.priority).join(Tenant, Tenant.id == Job.tenant_id).where(Job.id == job_id)
    ).one_or_none()
    if row is None or row.status != JobStatus.QUEUED:
        return None
    return row.queue, settings.default_priority if row.priority is None else row.priority


def tenant_priority(session: Session, tenant_id: str, settings: Settings) -> int:
    priority = session.execute(select(Tenant.priority).where(Tenant.id == tenant_id)).scalar_one_or_none()
    return settings.default_priority if priority is None else priority
