"""Business rules of webhooks: endpoints and their secrets, the outbox listener, the delivery log.

The outbox: :func:`app.jobs.lifecycle.record_event` calls :func:`enqueue_for_event`, so the delivery
rows of a job event are inserted in the same transaction as the job's state change — a rolled-back
transition sends nothing, a committed one is never lost. :mod:`app.webhooks.relay` sends them later,
outside any transaction. Every query here is scoped by tenant: another tenant's endpoint
is indistinguishable from one that does not exist (404).
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CursorResult, Select, delete, func, or_, select, update
from sqlalchemy.orm import Session, undefer
from sqlalchemy.orm.attributes import flag_modified

from app.config import Settings, get_settings
from app.db import utcnow
from app.errors import conflict, not_found, unprocessable
from app.jobs.models import JobEvent
from app.netsafety import UnsafeURLError, check_url
from app.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from app.webhooks.schemas import WEBHOOK_EVENT_TYPES, EndpointCreate, EndpointUpdate

SECRET_PREFIX = "whsec_"
_STATUS_OF_EVENT = {
    "job.queued": "queued",
    "job.started": "running",
    "job.progress": "running",
    "job.succeeded": "succeeded",
    "job.failed": "failed",
    "job.cancelled": "cancelled",
}
# Query strings of URLs in error messages may hold presigned credentials; payloads never carry them.
_URL_QUERY = re.compile(r"(https?://[^\s?#]+)\?\S*")


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def check_webhook_url(url: str, settings: Settings, field: str = "url") -> None:
    """422 problem+json unless ``url`` passes :func:`app.netsafety.check_url`."""
    try:
        check_url(url, settings)
    except UnsafeURLError as exc:
        raise unprocessable(f"{field}: {exc}", [{"field": field, "message": str(exc), "type": "unsafe_url"}]) from exc


# Endpoints ------------------------------------------------------------------------------------------


def _scoped(tenant_id: str) -> Select[WebhookEndpoint]:
    # One-off job endpoints (job_id set) are internal: the API manages only the tenant's named endpoints.
    return select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id, WebhookEndpoint.job_id.is_(None))


def get_endpoint(session: Session, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
    endpoint = session.execute(_scoped(tenant_id).where(WebhookEndpoint.id == endpoint_id)).scalar_one_or_none()
    if endpoint is None:
        raise not_found("webhook endpoint", endpoint_id)
    return endpoint


def create_endpoint(session: Session, tenant_id: str, body: EndpointCreate, settings: Settings) -> WebhookEndpoint:
    """Vet the URL and insert the endpoint with a fresh secret (the caller shows it once)."""
    check_webhook_url(body.url, settings)
    endpoint = WebhookEndpoint(
        tenant_id=tenant_id,
        url=body.url,
        events=_dedupe(body.events),
        description=body.description,
        secret=new_secret(),
    )
    session.add(endpoint)
    session.commit()
    return endpoint


def _dedupe(events: Sequence[str] | None) -> list[str] | None:
    return None if events is None else [e for e in WEBHOOK_EVENT_TYPES if e in set(events)]


def list_endpoints(
    session: Session, tenant_id: str, after: str | None, limit: int
) -> tuple[list[WebhookEndpoint], bool]:
    """Oldest first (ids are time-ordered); ``after`` is the last id of the previous page."""
    stmt = _scoped(tenant_id).order_by(WebhookEndpoint.id)
    if after:
        stmt = stmt.where(WebhookEndpoint.id > after)
    rows = list(session.execute(stmt.limit(limit + 1)).scalars())
    return rows[:limit], len(rows) > limit


def update_endpoint(
    session: Session, tenant_id: str, endpoint_id: str, body: EndpointUpdate, settings: Settings
) -> WebhookEndpoint:
    endpoint = get_endpoint(session, tenant_id, endpoint_id)
    changes = body.model_dump(exclude_unset=True)
    if changes.get("url") is not None:
        check_webhook_url(changes["url"], settings)
        endpoint.url = changes["url"]
    if "events" in changes:  # an explicit null means "every event type"
        endpoint.events = _dedupe(changes["events"])
    if changes.get("description") is not None:
        endpoint.description = changes["description"]
    if changes.get("enabled") is not None:
        endpoint.enabled = changes["enabled"]
        endpoint.disabled_reason = None if changes["enabled"] else "disabled by the tenant"
    endpoint.updated_at = utcnow()
    session.commit()
    return endpoint


def delete_endpoint(session: Session, tenant_id: str, endpoint_id: str) -> None:
    """Delete the endpoint; its pending deliveries and log go with it (ON DELETE CASCADE)."""
    endpoint = get_endpoint(session, tenant_id, endpoint_id)
    session.delete(endpoint)
    session.commit()


def rotate_secret(
    session: Session, tenant_id: str, endpoint_id: str, overlap_s: int | None, settings: Settings
) -> WebhookEndpoint:
    """New secret now; the current one keeps signing (alongside) for ``overlap_s`` seconds."""
    endpoint = get_endpoint(session, tenant_id, endpoint_id)
    overlap = settings.webhook_secret_overlap_s if overlap_s is None else overlap_s
    now = utcnow()
    endpoint.previous_secret = endpoint.secret if overlap > 0 else None
    endpoint.previous_secret_expires_at = now + timedelta(seconds=overlap) if overlap > 0 else None
    endpoint.secret = new_secret()
    endpoint.updated_at = now
    session.commit()
    return endpoint


def reencrypt_secrets(session: Session) -> int:
    """Re-encrypt every endpoint's secrets under the first of ``MODELPRESS_ENCRYPTION_KEYS`` (after a key
    rotation, before the old key is dropped from the list); returns how many endpoints were rewritten."""
    secrets_loaded = select(WebhookEndpoint).options(
        undefer(WebhookEndpoint.secret), undefer(WebhookEndpoint.previous_secret)
    )
    endpoints = list(session.execute(secrets_loaded).scalars())
    for endpoint in endpoints:
        flag_modified(endpoint, "secret")  # decrypted with whichever key matched, written with the first
        if endpoint.previous_secret is not None:
            flag_modified(endpoint, "previous_secret")
    session.commit()
    return len(endpoints)


def create_job_endpoint(session: Session, tenant_id: str, job_id: str, url: str) -> str:
    """The hidden endpoint of a job's one-off ``webhook_url``, with its own secret (returned, shown once).

    Called by job creation inside its transaction, before ``job.queued`` is recorded, so that event
    reaches the URL too. The URL was already vetted by :func:`check_webhook_url`.
    """
    secret = new_secret()
    session.add(WebhookEndpoint(tenant_id=tenant_id, job_id=job_id, url=url, description="one-off", secret=secret))
    session.flush()
    return secret


def job_webhook_secret(session: Session, tenant_id: str, job_id: str) -> str | None:
    """The secret of a job's one-off endpoint (for an idempotent replay of the creating request)."""
    return session.execute(
        select(WebhookEndpoint.secret).where(WebhookEndpoint.tenant_id == tenant_id, WebhookEndpoint.job_id == job_id)
    ).scalar_one_or_none()


# The outbox -----------------------------------------------------------------------------------------


def _scrub(text: str) -> str:
    return _URL_QUERY.sub(r"\1?…", text)


def build_payload(event: JobEvent) -> dict[str, Any]:
    """A thin Standard Webhooks payload: ids, status and facts; never secrets, presigned URLs or the spec."""
    data: dict[str, Any] = {"job_id": event.job_id, "status": _STATUS_OF_EVENT[event.type], "event_id": event.id}
    raw = event.data or {}
    if event.type == "job.started":
        data["attempt"] = raw.get("attempt")
    elif event.type == "job.progress":
        data["progress"] = raw.get("progress")
        data["message"] = _scrub(str(raw.get("message", "")))[:500]
    elif event.type == "job.succeeded":
        data["summary"] = raw.get("summary")
        # Paths, sizes and digests only: download URLs come from GET /v1/jobs/{id}/artifacts when needed.
        data["artifacts"] = [
            {"path": f.get("path"), "size": f.get("size"), "sha256": f.get("sha256")}
            for f in raw.get("artifacts", [])
            if isinstance(f, dict)
        ]
    elif event.type == "job.failed":
        error = raw.get("error") or {}
        data["error"] = {"type": error.get("type"), "message": _scrub(str(error.get("message", "")))[:4000]}
    return {"type": event.type, "timestamp": event.created_at.isoformat(), "data": data}


def _progress_throttled(session: Session, job_id: str, interval_s: float) -> bool:
    """At most one ``job.progress`` webhook per job every ``interval_s`` seconds (workers report far more often)."""
    last = session.execute(
        select(func.max(WebhookDelivery.created_at)).where(
            WebhookDelivery.job_id == job_id, WebhookDelivery.event_type == "job.progress"
        )
    ).scalar_one_or_none()
    if last is None:
        return False
    if last.tzinfo is None:  # func.max bypasses the column type on SQLite
        from datetime import UTC

        last = last.replace(tzinfo=UTC)
    return utcnow() - last < timedelta(seconds=interval_s)


def enqueue_for_event(session: Session, event: JobEvent) -> None:
    """Insert one delivery per interested endpoint, inside the transaction that recorded ``event``."""
    if event.type not in _STATUS_OF_EVENT:
        return
    endpoints = [
        endpoint
        for endpoint in session.execute(
            select(WebhookEndpoint).where(
                WebhookEndpoint.tenant_id == event.tenant_id,
                WebhookEndpoint.enabled.is_(True),
                or_(WebhookEndpoint.job_id.is_(None), WebhookEndpoint.job_id == event.job_id),
            )
        ).scalars()
        if endpoint.events is None or event.type in endpoint.events
    ]
    if not endpoints:
        return
    if event.type == "job.progress" and _progress_throttled(
        session, event.job_id, get_settings().webhook_progress_interval_s
    ):
        return
    payload = build_payload(event)
    now = utcnow()
    for endpoint in endpoints:
        session.add(
            WebhookDelivery(
                tenant_id=event.tenant_id,
                endpoint_id=endpoint.id,
                job_id=event.job_id,
                event_type=event.type,
                payload=payload,
                next_attempt_at=now,
                created_at=now,
            )
        )
    session.flush()


# The delivery log -----------------------------------------------------------------------------------


def list_deliveries(
    session: Session, tenant_id: str, endpoint_id: str, status: str | None, after: str | None, limit: int
) -> tuple[list[tuple[WebhookDelivery, list[WebhookAttempt]]], bool]:
    """Newest first, each with its attempts (oldest first); ``after`` is the last delivery id of the previous page."""
    get_endpoint(session, tenant_id, endpoint_id)
    stmt = select(WebhookDelivery).where(
        WebhookDelivery.tenant_id == tenant_id, WebhookDelivery.endpoint_id == endpoint_id
    )
    if status:
        stmt = stmt.where(WebhookDelivery.status == status)
    if after:
        cursor = session.execute(
            select(WebhookDelivery.seq).where(WebhookDelivery.id == after, WebhookDelivery.tenant_id == tenant_id)
        ).scalar_one_or_none()
        if cursor is None:
            raise unprocessable(f"after: unknown delivery {after!r}")
        stmt = stmt.where(WebhookDelivery.seq < cursor)
    rows = list(session.execute(stmt.order_by(WebhookDelivery.seq.desc()).limit(limit + 1)).scalars())
    page = rows[:limit]
    attempts: dict[str, list[WebhookAttempt]] = {d.id: [] for d in page}
    if page:
        for attempt in session.execute(
            select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(list(attempts))).order_by(WebhookAttempt.id)
        ).scalars():
            attempts[attempt.delivery_id].append(attempt)
    return [(d, attempts[d.id]) for d in page], len(rows) > limit


def get_delivery(session: Session, tenant_id: str, endpoint_id: str, delivery_id: str) -> WebhookDelivery:
    get_endpoint(session, tenant_id, endpoint_id)
    delivery = session.execute(
        select(WebhookDelivery).where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.tenant_id == tenant_id,
            WebhookDelivery.endpoint_id == endpoint_id,
        )
    ).scalar_one_or_none()
    if delivery is None:
        raise not_found("webhook delivery", delivery_id)
    return delivery


def attempts_of(session: Session, delivery_id: str) -> list[WebhookAttempt]:
    return list(
        session.execute(
            select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id).order_by(WebhookAttempt.id)
        ).scalars()
    )


def redeliver(session: Session, tenant_id: str, endpoint_id: str, delivery_id: str) -> WebhookDelivery:
    """Send a finished delivery again (same ``webhook-id``), with a fresh retry budget.

    It keeps its place in the endpoint's order, so newer pending events wait behind it.
    """
    endpoint = get_endpoint(session, tenant_id, endpoint_id)
    delivery = get_delivery(session, tenant_id, endpoint_id, delivery_id)
    if not endpoint.enabled:
        raise conflict(f"webhook endpoint {endpoint_id} is disabled; enable it first (PATCH enabled=true)")
    now = utcnow()
    updated = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.seq == delivery.seq, WebhookDelivery.status.in_(("delivered", "failed")))
        .values(status="pending", attempt_count=0, next_attempt_at=now, delivered_at=None)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    if updated != 1:
        session.rollback()
        raise conflict(f"delivery {delivery_id} is still pending; it will be retried automatically")
    session.commit()
    session.refresh(delivery)
    return delivery


PRUNE_DELIVERIES_TASK = "modelpress.prune_webhook_deliveries"


def prune_deliveries(session: Session, older_than: timedelta, now: datetime | None = None) -> int:
    """Delete finished deliveries (delivered or failed) created before ``now - older_than``, with their
    attempt log; pending ones are never pruned. Returns how many deliveries went."""
    cutoff = (now or utcnow()) - older_than
    finished = select(WebhookDelivery.id).where(
        WebhookDelivery.status.in_(("delivered", "failed")), WebhookDelivery.created_at < cutoff
    )
    session.execute(delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(finished)))
    result = session.execute(delete(WebhookDelivery).where(WebhookDelivery.id.in_(finished)))
    session.commit()
    return int(result.rowcount) if isinstance(result, CursorResult) else 0
