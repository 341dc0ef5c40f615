"""Every SQLAlchemy model, imported in one place for Alembic and for metadata.create_all in tests."""

from app.auth.models import ApiKey, Tenant
from app.db import Base
from app.heartbeats.models import WorkerHeartbeat
from app.jobs.models import IdempotencyKey, Job, JobEvent, JobMetadata
from app.uploads.models import Upload
from app.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint

__all__ = [
    "ApiKey",
    "Base",
    "IdempotencyKey",
    "Job",
    "JobEvent",
    "JobMetadata",
    "Tenant",
    "Upload",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WorkerHeartbeat",
]
