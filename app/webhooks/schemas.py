"""The webhooks API's request bodies, and its responses built from rows. The response shapes are the
shared wire models (:mod:`modelpress.schemas`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from app.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from modelpress.schemas import AttemptOut, DeliveryList, DeliveryOut, EndpointList, EndpointOut, EndpointWithSecret

__all__ = [
    "WEBHOOK_EVENT_TYPES",
    "AttemptOut",
    "DeliveryList",
    "DeliveryOut",
    "EndpointCreate",
    "EndpointList",
    "EndpointOut",
    "EndpointUpdate",
    "EndpointWithSecret",
    "RotateSecret",
    "WebhookEventType",
    "delivery_out",
    "endpoint_out",
    "endpoint_with_secret",
]

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


def endpoint_out(endpoint: WebhookEndpoint) -> EndpointOut:
    return EndpointOut.model_validate(endpoint, from_attributes=True)


def endpoint_with_secret(endpoint: WebhookEndpoint) -> EndpointWithSecret:
    """For create and rotate-secret: the endpoint with its (new) signing secret."""
    return EndpointWithSecret.model_validate(endpoint, from_attributes=True)


def delivery_out(delivery: WebhookDelivery, attempts: list[WebhookAttempt]) -> DeliveryOut:
    return DeliveryOut(
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
        attempts=[AttemptOut.model_validate(a, from_attributes=True) for a in attempts],
    )
