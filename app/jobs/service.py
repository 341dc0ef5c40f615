"""Business rules of jobs: create (idempotent), read, list, cancel, events, artifacts.

Every query filters on the caller's tenant (the ORM's through :func:`_scoped`, the request engine's Core
statements in their ``WHERE``); another tenant's job is indistinguishable from one that does not exist.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CursorResult, Select, bindparam, delete, exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session, joinedload

from app.auth import quotas
from app.auth.service import Principal
from app.broker import enqueue_job
from app.config import Settings
from app.db import utcnow
from app.errors import conflict, not_found, unprocessable
from app.jobs import lifecycle
from app.jobs.models import IdempotencyKey, Job, JobEvent, JobMetadata
from app.jobs.schemas import JOB_OUT_COLUMNS, EventOut, JobOut, job_out_from
from app.jobs.spec import DistillJobStep, JobSpec, Source
from app.storage import Storage, split_s3_uri
from app.storage_keys import upload_key
from app.uploads.service import require_complete
from app.webhooks import service as webhooks
from workers.compression.recipe import QuantizeStep, group_size_problem, llama_layout_widths


def _scoped(tenant_id: str) -> Select[Job]:
    return select(Job).where(Job.tenant_id == tenant_id)


_JOB_COLUMNS = tuple(Job.__table__.c[name] for name in JOB_OUT_COLUMNS)
# A job and its metadata rows (one row per item, or one with NULLs), scoped by tenant: one statement.
_JOB_READ = (
    select(
        *_JOB_COLUMNS,
        JobMetadata.key.label("metadata_key"),
        JobMetadata.value.label("metadata_value"),
    )
    .outerjoin(JobMetadata, JobMetadata.job_id == Job.id)
    .where(Job.id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id"))
    .order_by(JobMetadata.key)
)


async def read_job(engine: AsyncEngine, tenant_id: str, job_id: str) -> JobOut:
    """One job as the API shows it, read with a Core statement on the request engine (see
    :func:`app.db.create_request_engine`): the read every poller repeats builds no mapped instance."""
    async with engine.connect() as conn:
        rows = (await conn.execute(_JOB_READ, {"job_id": job_id, "tenant_id": tenant_id})).all()
    if not rows:
        raise not_found("job", job_id)
    metadata = {row.metadata_key: row.metadata_value for row in rows if row.metadata_key is not None}
    return job_out_from(rows[0]._asdict(), metadata)


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    # The metadata rows joined in: one query for the job read, not a second (selectin) round trip.
    stmt = _scoped(tenant_id).where(Job.id == job_id).options(joinedload(Job.metadata_items))
    job = session.execute(stmt).unique().scalar_one_or_none()
    if job is None:
        raise not_found("job", job_id)
    return job


def _check_source(session: Session, tenant_id: str, source: Source | None, field: str, settings: Settings) -> None:
    if source is None:
        return
    if source.upload_id is not None:
        require_complete(session, tenant_id, source.upload_id, field)
    elif source.uri is not None:
        bucket, _ = split_s3_uri(source.uri)
        if bucket not in settings.allowed_source_buckets:
            raise unprocessable(
                f"{field}.uri: bucket {bucket!r} is not on the operator's allow-list",
                [{"field": f"{field}.uri", "message": "bucket not allowed"}],
            )


# A model's config.json larger than this is not read at submission (the worker still checks the model).
MAX_CONFIG_BYTES = 1 << 20


def _check_model_shapes(session: Session, tenant_id: str, spec: JobSpec, storage: Storage) -> None:
    """Refuse at submission a quantize step whose group size cannot fit the uploaded model's Linears, read
    from its config.json (Llama layout; up to the first step that changes shapes). The worker checks the
    loaded model again, whatever its layout."""
    if spec.model.upload_id is None:
        return
    upload = require_complete(session, tenant_id, spec.model.upload_id, "model")
    entry = next((f for f in upload.files if f["path"] == "config.json"), None)
    if entry is None or entry["size"] > MAX_CONFIG_BYTES:
        return
    raw = storage.get_bytes(upload_key(tenant_id, upload.id, "config.json"))
    try:
        config = json.loads(raw) if hashlib.sha256(raw).hexdigest() == entry["sha256"] else None
    except ValueError:
        config = None
    if not isinstance(config, dict):
        return  # the worker fails the job with the exact reason
    for index, step in enumerate(spec.steps):
        if step.method == "distill" or getattr(step, "algorithm", None) == "structured":
            return
        if isinstance(step, QuantizeStep):
            problem = group_size_problem(step.group_size, llama_layout_widths(config, step.ignore) or [])
            if problem is not None:
                field = f"steps.{index}.group_size"
                raise unprocessable(f"{field}: {problem}", [{"field": field, "message": problem}])


def _request_hash(canonical: dict[str, Any]) -> str:
    """Idempotency fingerprint: a hash of exactly the spec that is stored (:meth:`JobSpec.canonical`)."""
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# How long a reservation without a job blocks its key (see _claim_idempotency_key).
IDEMPOTENCY_RESERVATION_S = 60


@dataclass(frozen=True)
class _Reservation:
    """An Idempotency-Key this request holds: its row and the ``created_at`` it stamped there. A
    request that stalls past :data:`IDEMPOTENCY_RESERVATION_S` can lose the key to a retry; the stamp
    tells it so (see :func:`_link_idempotency_key`)."""

    row_id: int
    stamp: datetime


def _claim_idempotency_key(session: Session, tenant_id: str, key: str, digest: str) -> Job | _Reservation:
    """Reserve ``key`` (committed at once, so a concurrent twin sees it) or return the job it made."""
    existing = session.execute(
        select(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key)
    ).scalar_one_or_none()
    if existing is None:
        stamp = utcnow()
        row = IdempotencyKey(tenant_id=tenant_id, key=key, request_hash=digest, created_at=stamp)
        session.add(row)
        try:
            session.commit()
            return _Reservation(row.id, stamp)
        except IntegrityError:
            session.rollback()
            existing = session.execute(
                select(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key)
            ).scalar_one()
    if existing.request_hash != digest:
        raise unprocessable("Idempotency-Key was already used with a different request body")
    if existing.job_id is None:
        # Reserved, no job yet. Creating a job takes well under a second; an old reservation belongs to a
        # request that died between the two commits (process killed, database gone), so a retry takes
        # it over instead of meeting 409 forever. The guarded UPDATE lets only one retry win.
        stale_before = utcnow() - timedelta(seconds=IDEMPOTENCY_RESERVATION_S)
        if existing.created_at < stale_before:
            stamp = utcnow()
            taken = session.execute(
                update(IdempotencyKey)
                .where(
                    IdempotencyKey.id == existing.id,
                    IdempotencyKey.job_id.is_(None),
                    IdempotencyKey.created_at < stale_before,
                )
                .values(created_at=stamp)
                .execution_options(synchronize_session=False)
            )
            session.commit()
            if isinstance(taken, CursorResult) and taken.rowcount == 1:
                return _Reservation(existing.id, stamp)
        raise conflict("a request with this Idempotency-Key is still in progress; retry shortly")
    return get_job(session, tenant_id, existing.job_id)


def _mine(reservation: _Reservation) -> Any:
    """The reservation's row, only while no job is linked and no retry has taken it over."""
    return (
        (IdempotencyKey.id == reservation.row_id)
        & IdempotencyKey.job_id.is_(None)
        & (IdempotencyKey.created_at == reservation.stamp)
    )


def _link_idempotency_key(session: Session, reservation: _Reservation, job_id: str) -> None:
    """Point the key at the new job in the job's transaction; 409 (and no job) if a retry took it over."""
    linked = session.execute(
        update(IdempotencyKey)
        .where(_mine(reservation))
        .values(job_id=job_id)
        .execution_options(synchronize_session=False)
    )
    if not (isinstance(linked, CursorResult) and linked.rowcount == 1):
        raise conflict("this request took too long and a retry with the same Idempotency-Key took it over")


def _release_idempotency_key(session: Session, reservation: _Reservation) -> None:
    session.rollback()
    session.execute(delete(IdempotencyKey).where(_mine(reservation)).execution_options(synchronize_session=False))
    session.commit()


def create_job(
    session: Session,
    principal: Principal,
    spec: JobSpec,
    settings: Settings,
    idempotency_key: str | None,
    *,
    storage: Storage | None = None,
) -> tuple[Job, bool]:
    """Validate inputs, insert the job with its first event in one transaction, then enqueue.

    Returns ``(job, created)``; ``created`` is False when an idempotent replay returned an existing job.
    """
    tenant_id = principal.tenant_id
    canonical = spec.canonical()
    reservation: _Reservation | None = None
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= 255:
            raise unprocessable("Idempotency-Key must be 1-255 characters")
        replay = _claim_idempotency_key(session, tenant_id, idempotency_key, _request_hash(canonical))
        if isinstance(replay, _Reservation):
            reservation = replay
        else:
            # An idempotent replay answers like the original 201, one-off webhook secret included.
            setattr(replay, "webhook_secret", webhooks.job_webhook_secret(session, tenant_id, replay.id))  # noqa: B010
            return replay, False
    try:
        _check_source(session, tenant_id, spec.model, "model", settings)
        if storage is not None:
            _check_model_shapes(session, tenant_id, spec, storage)
        _check_source(session, tenant_id, spec.calibration, "calibration", settings)
        _check_source(session, tenant_id, spec.evaluation, "evaluation", settings)
        _check_source(session, tenant_id, spec.training, "training", settings)
        for index, step in enumerate(spec.steps):
            if isinstance(step, DistillJobStep):
                _check_source(session, tenant_id, step.student.source(), f"steps.{index}.student", settings)
        if spec.webhook_url is not None:
            webhooks.check_webhook_url(spec.webhook_url, settings, field="webhook_url")  # 422 if unsafe
        hardware = spec.hardware if spec.hardware != "auto" else ("gpu" if settings.gpu_queue else "cpu")
        # 429 when the tenant's queue is full; locks the tenant row until the commit so twins count each other.
        limits = quotas.check_queued_quota(session, tenant_id, settings)
        job = Job(
            tenant_id=tenant_id,
            spec=canonical,
            queue=hardware,
            steps=[{"index": i, "method": s.method, "status": "pending"} for i, s in enumerate(spec.steps)],
            metadata_items=[JobMetadata(key=k, value=v) for k, v in spec.metadata.items()],
        )
        session.add(job)
        session.flush()
        if spec.webhook_url is not None:
            # Before job.queued is recorded, so that event reaches the one-off URL too. The secret is not
            # a column of Job: it rides on the instance to the 201 response (JobOut.webhook_secret).
            secret = webhooks.create_job_endpoint(session, tenant_id, job.id, spec.webhook_url)
            setattr(job, "webhook_secret", secret)  # noqa: B010
        lifecycle.record_event(session, job.id, tenant_id, "job.queued", {"status": "queued"})
        if reservation is not None:
            _link_idempotency_key(session, reservation, job.id)
        session.commit()
    except BaseException:
        if reservation is not None:
            _release_idempotency_key(session, reservation)
        raise
    # Only after the commit: a worker must never receive a job it cannot read. If the broker is down the
    # job stays queued, marked so the reaper rings it as soon as the broker answers again.
    if not enqueue_job(job.id, job.queue, priority=limits.priority):
        lifecycle.mark_unrung(session, job.id)
        session.commit()
    return job, True


async def list_jobs(
    engine: AsyncEngine,
    tenant_id: str,
    *,
    status: list[str] | None,
    metadata: dict[str, str],
    after: str | None,
    limit: int,
) -> tuple[list[JobOut], bool]:
    """Newest first; ``after`` is the id of the last job of the previous page. Two Core statements on the
    request engine (the console polls this list): the page's jobs, then their metadata."""
    stmt = select(*_JOB_COLUMNS).where(Job.tenant_id == tenant_id)
    if status:
        stmt = stmt.where(Job.status.in_(status))
    for key, value in metadata.items():
        stmt = stmt.where(
            exists().where(JobMetadata.job_id == Job.id, JobMetadata.key == key, JobMetadata.value == value)
        )
    if after:
        stmt = stmt.where(Job.id < after)
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt.order_by(Job.id.desc()).limit(limit + 1))).all()
        page = rows[:limit]
        items: dict[str, dict[str, str]] = {row.id: {} for row in page}
        if items:
            pairs = (
                select(JobMetadata.job_id, JobMetadata.key, JobMetadata.value)
                .where(JobMetadata.job_id.in_(list(items)))
                .order_by(JobMetadata.job_id, JobMetadata.key)  # keys sorted, as in every read of a job
            )
            for job_id, key, value in await conn.execute(pairs):
                items[job_id][key] = value
    return [job_out_from(row._asdict(), items[row.id]) for row in page], len(rows) > limit


def cancel_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = get_job(session, tenant_id, job_id)
    new_status = lifecycle.request_cancel(session, job.id)
    if new_status is None:
        session.rollback()
        raise conflict(f"job {job_id} is already {job.status} and cannot be cancelled")
    session.commit()
    session.refresh(job)
    return job


_JOB_STATUS = select(Job.status).where(Job.id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id"))
_EVENTS_AFTER = (
    select(JobEvent.id, JobEvent.type, JobEvent.data, JobEvent.created_at)
    .where(
        JobEvent.job_id == bindparam("job_id"),
        JobEvent.tenant_id == bindparam("tenant_id"),
        JobEvent.id > bindparam("after"),
    )
    .order_by(JobEvent.id)
    .limit(bindparam("limit"))
)


async def list_events(
    engine: AsyncEngine, tenant_id: str, job_id: str, after: int, limit: int
) -> tuple[list[EventOut], bool, str]:
    """The job's events after event ``after``, oldest first, whether more follow, and the job's status
    (read first: an event recorded after it belongs to a later poll). Core statements on the request
    engine: the SSE stream repeats this twice a second for every open stream."""
    params = {"job_id": job_id, "tenant_id": tenant_id}
    async with engine.connect() as conn:
        status = (await conn.execute(_JOB_STATUS, params)).scalar_one_or_none()
        if status is None:
            raise not_found("job", job_id)
        rows = (await conn.execute(_EVENTS_AFTER, {**params, "after": after, "limit": limit + 1})).all()
    events = [EventOut.model_validate(row._asdict()) for row in rows[:limit]]
    return events, len(rows) > limit, status


def list_artifacts(session: Session, tenant_id: str, job_id: str, storage: Storage, ttl_s: int) -> dict[str, Any]:
    """The files of a succeeded job's manifest, each with a short-lived download URL."""
    job = get_job(session, tenant_id, job_id)
    if job.status != "succeeded" or not job.manifest_key:
        raise conflict(f"job {job_id} has no artifacts (status {job.status})")
    raw = storage.get_bytes(job.manifest_key)
    manifest = json.loads(raw)
    expires = utcnow() + timedelta(seconds=ttl_s)
    prefix = job.manifest_key.rsplit("/", 1)[0] + "/"  # the attempt that succeeded
    files = [
        {
            "path": f["path"],
            "size": f["size"],
            "sha256": f["sha256"],
            "url": storage.url_for_get(prefix + f["path"], ttl_s, filename=f["path"].rsplit("/", 1)[-1]),
            "expires_at": expires,
        }
        for f in manifest["files"]
    ]
    files.append(
        {
            "path": "manifest.json",
            "size": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(),
            "url": storage.url_for_get(job.manifest_key, ttl_s, filename="manifest.json"),
            "expires_at": expires,
        }
    )
    return {"data": files, "manifest_sha256": hashlib.sha256(raw).hexdigest()}
