"""Response models: the API's JSON shapes as typed pydantic models.

They mirror the server's response schemas field for field (``tests/sdk/test_openapi.py`` checks each one
against ``/openapi.json``); unknown fields from a newer server are kept, not refused, so an old client keeps
working. The server's own schema classes are not imported: they sit next to SQLAlchemy models.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


class APIModel(BaseModel):
    """Base of every response model: extra fields from a newer server are kept."""

    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------- uploads


class UploadFile(APIModel):
    path: str
    size: int
    sha256: str


class PartTarget(APIModel):
    part_number: int
    url: str


class FileTarget(APIModel):
    path: str
    url: str | None = None
    part_size: int | None = None
    parts: list[PartTarget] | None = None


class Upload(APIModel):
    id: str
    object: Literal["upload"] = "upload"
    status: Literal["pending", "complete", "expired"]
    total_bytes: int
    files: list[UploadFile]
    created_at: datetime
    completed_at: datetime | None
    expires_at: datetime
    targets: list[FileTarget] | None = None


class ReceivedPart(APIModel):
    part_number: int
    size: int


class ReceivedFile(APIModel):
    path: str
    size: int
    received: bool
    part_size: int | None = None
    parts: list[ReceivedPart] | None = None


class UploadProgress(APIModel):
    object: Literal["upload_progress"] = "upload_progress"
    upload_id: str
    status: Literal["pending", "complete", "expired"]
    files: list[ReceivedFile]


# ---------------------------------------------------------------- jobs


class Progress(APIModel):
    fraction: float
    message: str


class JobError(APIModel):
    type: str
    message: str


class StepState(APIModel):
    index: int
    method: str
    status: Literal["pending", "running", "succeeded", "failed", "cancelled"]
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None


class JobData(APIModel):
    """A job as the API returns it (:class:`modelpress.Job` adds the verbs)."""

    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    progress: Progress
    steps: list[StepState]
    error: JobError | None
    metadata: dict[str, str]
    summary: dict[str, Any] | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: dict[str, Any]
    webhook_secret: str | None = None

    @property
    def done(self) -> bool:
        """The job reached a terminal status (succeeded, failed or cancelled)."""
        return self.status in TERMINAL_STATUSES


class Event(APIModel):
    id: int
    type: str
    data: dict[str, Any]
    created_at: datetime


class Artifact(APIModel):
    path: str
    size: int
    sha256: str
    url: str
    expires_at: datetime


class ArtifactList(APIModel):
    object: Literal["list"] = "list"
    data: list[Artifact]
    manifest_sha256: str


# ---------------------------------------------------------------- webhooks


class WebhookEndpoint(APIModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str] | None
    description: str
    enabled: bool
    disabled_reason: str | None
    previous_secret_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime


class WebhookEndpointWithSecret(WebhookEndpoint):
    secret: str


class DeliveryAttempt(APIModel):
    attempted_at: datetime
    status_code: int | None
    latency_ms: int
    error: str | None


class WebhookDelivery(APIModel):
    id: str
    object: Literal["webhook_delivery"] = "webhook_delivery"
    event_type: str
    job_id: str | None
    status: Literal["pending", "delivered", "failed"]
    attempt_count: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    payload: dict[str, Any]
    attempts: list[DeliveryAttempt]


# ---------------------------------------------------------------- keys, limits, tenants


class ApiKey(APIModel):
    id: str
    object: Literal["api_key"] = "api_key"
    tenant_id: str
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKey):
    key: str


class LimitValues(APIModel):
    max_running_jobs: int
    max_queued_jobs: int
    max_upload_bytes_per_day: int
    requests_per_minute: int
    priority: int


class Usage(APIModel):
    running_jobs: int
    queued_jobs: int
    upload_bytes_last_24h: int


class Limits(APIModel):
    object: Literal["limits"] = "limits"
    tenant_id: str
    limits: LimitValues
    usage: Usage


class QuotaOverrides(APIModel):
    max_running_jobs: int | None = None
    max_queued_jobs: int | None = None
    max_upload_bytes: int | None = None
    rate_limit_per_minute: int | None = None
    priority: int | None = None


class Tenant(APIModel):
    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    created_at: datetime
    overrides: QuotaOverrides
    limits: LimitValues


# The server's schema name for each model: what the OpenAPI test compares them with.
SCHEMAS: dict[str, type[APIModel]] = {
    "UploadOut": Upload,
    "FileIn": UploadFile,
    "FileTarget": FileTarget,
    "PartTarget": PartTarget,
    "UploadProgress": UploadProgress,
    "ReceivedFile": ReceivedFile,
    "ReceivedPart": ReceivedPart,
    "JobOut": JobData,
    "Progress": Progress,
    "JobError": JobError,
    "StepState": StepState,
    "EventOut": Event,
    "ArtifactOut": Artifact,
    "ArtifactList": ArtifactList,
    "EndpointOut": WebhookEndpoint,
    "EndpointWithSecret": WebhookEndpointWithSecret,
    "AttemptOut": DeliveryAttempt,
    "DeliveryOut": WebhookDelivery,
    "KeyOut": ApiKey,
    "KeyCreated": ApiKeyCreated,
    "LimitsOut": LimitValues,
    "UsageOut": Usage,
    "TenantLimits": Limits,
    "QuotaOverrides": QuotaOverrides,
    "TenantOut": Tenant,
}
