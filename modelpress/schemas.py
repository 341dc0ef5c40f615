"""The API's JSON shapes, defined once: the server answers with them and the client parses into them.

Each class is the OpenAPI component of the same name (``/openapi.json``). The server builds them from its
database rows (``app/<resource>/schemas.py``); the client (:mod:`modelpress`) returns them, under the friendlier
names at the bottom of this module. Pure pydantic: importing this module loads neither FastAPI nor SQLAlchemy
nor torch, so the client stays standalone.

Response shapes keep the fields a newer server adds (``extra="allow"``) instead of refusing them, so an old
client keeps working. The two shapes that are also request bodies (:class:`FileIn`, :class:`QuotaOverrides`)
refuse unknown fields, as the server does for every request.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Bounds of the integers a client sends: the database's INTEGER columns, and the largest integer every JSON
# parser (and the OpenAPI document's ``maximum``, read as a double by most tools) represents exactly, which
# bounds the BIGINT ones. Past them a client gets a 422 naming the field, not a 500 from the driver.
INT32_MAX = 2**31 - 1
JSON_INT_MAX = 2**53 - 1

JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
UploadStatus = Literal["pending", "complete", "expired"]

T = TypeVar("T")


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A ``Retry-After`` header (RFC 9110: delay-seconds or an HTTP date) as seconds from ``now`` (default: the
    current time), never negative; None when absent or unreadable. The API sends it with 429 and 503, and the
    webhook relay reads it from receivers."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class WireModel(BaseModel):
    """Base of every response shape: fields from a newer server are kept, not refused."""

    model_config = ConfigDict(extra="allow")


class ListOf(WireModel, Generic[T]):
    """One page of a cursor-paginated list (``?after=<last id>&limit=``); ``has_more``: another page follows."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool


# ---------------------------------------------------------------- uploads

# Names the local storage backend gives its own files beside an object: a partial write
# (``<name>.<random>.part``) and a multipart upload's parts (``<name>.parts/00001``).
RESERVED_SUFFIXES = (".part", ".parts")
MAX_COMPONENT_BYTES = 255  # a file name on every common file system (ext4, XFS, APFS, NTFS)
MAX_PATH_BYTES = 900  # S3 keys are at most 1024 bytes; the upload's prefix and a part suffix take the rest


def check_upload_path(path: str) -> str:
    """A path every storage backend can hold as the same object (S3 key, file under a directory), or ValueError.

    Relative, ``/``-separated, each component a plain file name: no NUL or other control characters, no
    backslash (a separator elsewhere), no empty, ``.`` or ``..`` component, no hidden (dot) names, no
    component over 255 bytes, and none of the local backend's reserved suffixes.
    """
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid UTF-8 (no lone surrogates)") from exc
    if len(encoded) > MAX_PATH_BYTES:
        raise ValueError(f"at most {MAX_PATH_BYTES} bytes in UTF-8")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in path):
        raise ValueError("control characters (NUL included) are not allowed")
    if "\\" in path:
        raise ValueError("backslashes are not allowed; separate directories with '/'")
    if path.startswith("/"):
        raise ValueError("must be relative, not absolute")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ValueError("empty, '.' and '..' path components are not allowed")
        if part.startswith("."):
            raise ValueError(f"hidden names are not allowed: {part!r}")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise ValueError(f"each path component is at most {MAX_COMPONENT_BYTES} bytes")
        if part.endswith(RESERVED_SUFFIXES):
            raise ValueError(f"names ending in {' or '.join(RESERVED_SUFFIXES)} are reserved")
    return path


class FileIn(BaseModel):
    """One file of an upload: declared by the client, echoed by the server."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        min_length=1,
        max_length=500,
        description="relative path inside the upload, e.g. 'model.safetensors': '/'-separated, no '..', no "
        "hidden or empty components, no control characters or backslashes, each component at most 255 bytes",
    )
    size: int = Field(ge=0, le=JSON_INT_MAX, strict=True)  # strict: `false` is no size
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _portable(cls, value: str) -> str:
        return check_upload_path(value)


class PartTarget(WireModel):
    part_number: int
    url: str


class FileTarget(WireModel):
    path: str
    url: str | None = None
    part_size: int | None = None
    parts: list[PartTarget] | None = None


class UploadOut(WireModel):
    id: str
    object: Literal["upload"] = "upload"
    status: UploadStatus = Field(description="expired: not completed in time; whatever was PUT has been deleted")
    total_bytes: int
    files: list[FileIn]
    created_at: datetime
    completed_at: datetime | None
    expires_at: datetime
    targets: list[FileTarget] | None = Field(default=None, description="where to PUT each file (on creation only)")


class ReceivedPart(WireModel):
    part_number: int
    size: int


class ReceivedFile(WireModel):
    path: str
    size: int = Field(description="declared size")
    received: bool = Field(description="the whole file is in storage (single PUT, or its parts assembled)")
    part_size: int | None = Field(default=None, description="multipart files: size of every part but the last")
    parts: list[ReceivedPart] | None = Field(default=None, description="multipart files: the parts PUT so far")


class UploadProgress(WireModel):
    """What storage holds of a pending upload, so that a client resumes by PUTting only what is missing."""

    object: Literal["upload_progress"] = "upload_progress"
    upload_id: str
    status: UploadStatus
    files: list[ReceivedFile]


# ---------------------------------------------------------------- jobs


class Progress(WireModel):
    fraction: float = Field(ge=0.0, le=1.0)
    message: str


class JobError(WireModel):
    type: str
    message: str


class StepState(WireModel):
    index: int
    method: str
    status: Literal["pending", "running", "succeeded", "failed", "cancelled"]
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None


class JobOut(WireModel):
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
    webhook_secret: str | None = Field(
        default=None, description="whsec_… secret of the one-off webhook_url; only in the creating response"
    )

    @property
    def done(self) -> bool:
        """The job reached a terminal status (succeeded, failed or cancelled)."""
        return self.status in TERMINAL_STATUSES


class JobList(ListOf[JobOut]):
    """A page of jobs, newest first."""


class EventOut(WireModel):
    id: int
    type: str
    data: dict[str, Any]
    created_at: datetime


class EventList(ListOf[EventOut]):
    """A page of a job's events, oldest first."""


class ArtifactOut(WireModel):
    path: str
    size: int
    sha256: str
    url: str
    expires_at: datetime


class ArtifactList(WireModel):
    object: Literal["list"] = "list"
    data: list[ArtifactOut]
    manifest_sha256: str


# ---------------------------------------------------------------- webhooks


class EndpointOut(WireModel):
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


class EndpointWithSecret(EndpointOut):
    """Returned by create and rotate-secret only: the signing secret is shown once."""

    secret: str = Field(description="whsec_… signing secret; store it now, it is not shown again")


class EndpointList(ListOf[EndpointOut]):
    """A page of webhook endpoints."""


class AttemptOut(WireModel):
    attempted_at: datetime
    status_code: int | None
    latency_ms: int
    error: str | None


class DeliveryOut(WireModel):
    id: str = Field(description="the webhook-id header; the same on every retry")
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
    attempts: list[AttemptOut]


class DeliveryList(ListOf[DeliveryOut]):
    """A page of an endpoint's deliveries, newest first."""


# ---------------------------------------------------------------- keys, limits, tenants


class KeyOut(WireModel):
    """A key as listed: the public prefix, never the secret (which is not stored)."""

    id: str
    object: Literal["api_key"] = "api_key"
    tenant_id: str
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="the full key: shown this once, store it now")


class KeyList(WireModel):
    object: Literal["list"] = "list"
    data: list[KeyOut]


class QuotaOverrides(BaseModel):
    """Per-tenant overrides; null (or absent at creation) means the operator default."""

    model_config = ConfigDict(extra="forbid", strict=True)  # strict: `false` is not a quota of 0

    max_running_jobs: int | None = Field(default=None, ge=1, le=INT32_MAX, description="jobs running at once")
    max_queued_jobs: int | None = Field(default=None, ge=1, le=INT32_MAX, description="jobs waiting in the queue")
    max_upload_bytes: int | None = Field(
        default=None, ge=1, le=JSON_INT_MAX, description="upload bytes per rolling 24 hours"
    )
    rate_limit_per_minute: int | None = Field(
        default=None, ge=1, le=INT32_MAX, description="requests per minute per key"
    )
    priority: int | None = Field(default=None, ge=0, le=9, description="0 (lowest) … 9 (highest)")


class LimitsOut(WireModel):
    max_running_jobs: int
    max_queued_jobs: int
    max_upload_bytes_per_day: int
    requests_per_minute: int
    priority: int


class UsageOut(WireModel):
    running_jobs: int
    queued_jobs: int
    upload_bytes_last_24h: int


class TenantOut(WireModel):
    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    created_at: datetime
    overrides: QuotaOverrides
    limits: LimitsOut


class TenantList(ListOf[TenantOut]):
    """A page of tenants."""


class TenantLimits(WireModel):
    object: Literal["limits"] = "limits"
    tenant_id: str
    limits: LimitsOut
    usage: UsageOut


# The client's names for the shapes it returns (``modelpress.Upload``, …): the same classes.
Upload = UploadOut
UploadFile = FileIn
Event = EventOut
Artifact = ArtifactOut
WebhookEndpoint = EndpointOut
WebhookEndpointWithSecret = EndpointWithSecret
DeliveryAttempt = AttemptOut
WebhookDelivery = DeliveryOut
ApiKey = KeyOut
ApiKeyCreated = KeyCreated
LimitValues = LimitsOut
Usage = UsageOut
Limits = TenantLimits
Tenant = TenantOut
