"""Public request and response shapes of the webhooks API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from app.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint

# The job events a receiver can subscribe to (other job events, e.g. per-step ones, stay in the event log).
WebhookEventType = Literal["job.queued", "job.started", "job.progress", "job.succeeded", "job.failed", "job.cancelled"]
WEBHOOK_EVENT_TYPES: tuple[str, ...] = WebhookEventType.__args__  # type: ignore[attr-defined]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EndpointCreate(_Strict):
    url: str = Field(min_length=1, max_length=2000, description="https URL of the receiver")
    events: list[WebhookEventType] | None = Field(
        default=None, min_length=1, description="event types to receive; omitted or null: all of them"
    )
    description: str = Field(default="", max_length=500)


class EndpointUpdate(_Strict):
    # ``SkipJsonSchema[None]``: omitted is allowed, null is not, and the OpenAPI document says so.
    # The length bounds sit on the str (on the union they would meet a null with len()).
    url: Annotated[str, Field(min_length=1, max_length=2000)] | SkipJsonSchema[None] = None
    events: list[WebhookEventType] | None = Field(default=None, min_length=1)
    description: Annotated[str, Field(max_length=500)] | SkipJsonSchema[None] = None
    enabled: bool | SkipJsonSchema[None] = Field(
        default=None, description="true re-enables an endpoint disabled by a 410"
    )

    @field_validator("url", "description", "enabled")
    @classmethod
    def _not_null(cls, value: object) -> object:
        # Omitted means "unchanged"; an explicit null would otherwise be silently ignored too. Only
        # ``events`` gives null a meaning (every event type).
        if value is None:
            raise ValueError("must not be null; omit the field to leave it unchanged")
        return value


class RotateSecret(_Strict):
    overlap_s: int | None = Field(
        default=None, ge=0, le=7 * 24 * 3600, description="how long the old secret keeps signing; default 24 h"
    )


class EndpointOut(BaseModel):
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

    @classmethod
    def of(cls, endpoint: WebhookEndpoint) -> EndpointOut:
        return cls(
            id=endpoint.id,
            url=endpoint.url,
            events=endpoint.events,
            description=endpoint.description,
            enabled=endpoint.enabled,
            disabled_reason=endpoint.disabled_reason,
            previous_secret_expires_at=endpoint.previous_secret_expires_at,
            created_at=endpoint.created_at,
            updated_at=endpoint.updated_at,
        )


class EndpointWithSecret(EndpointOut):
    """Returned by create and rotate-secret only: the signing secret is shown once."""

    secret: str = Field(description="whsec_… signing secret; store it now, it is not shown again")


class EndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EndpointOut]
    has_more: bool


class AttemptOut(BaseModel):
    attempted_at: datetime
    status_code: int | None
    latency_ms: int
    error: str | None

    @classmethod
    def of(cls, attempt: WebhookAttempt) -> AttemptOut:
        return cls(
            attempted_at=attempt.attempted_at,
            status_code=attempt.status_code,
            latency_ms=attempt.latency_ms,
            error=attempt.error,
        )


class DeliveryOut(BaseModel):
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

    @classmethod
    def of(cls, delivery: WebhookDelivery, attempts: list[WebhookAttempt]) -> DeliveryOut:
        return cls(
            id=delivery.id,
            event_type=delivery.event_type,
            job_id=delivery.job_id,
            status=delivery.status,  # type: ignore[arg-type]
            attempt_count=delivery.attempt_count,
            next_attempt_at=delivery.next_attempt_at if delivery.status == "pending" else None,
            last_status_code=delivery.last_status_code,
            last_error=delivery.last_error,
            created_at=delivery.created_at,
            delivered_at=delivery.delivered_at,
            payload=delivery.payload,
            attempts=[AttemptOut.of(a) for a in attempts],
        )


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryOut]
    has_more: bool
