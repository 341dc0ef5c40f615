"""HTTP routes of /v1/webhooks. Thin: parse, call the service, shape the response."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Response

from app.auth.service import Principal
from app.deps import SessionDep, SettingsDep, require
from app.webhooks import service
from app.webhooks.schemas import (
    DeliveryList,
    DeliveryOut,
    EndpointCreate,
    EndpointList,
    EndpointOut,
    EndpointUpdate,
    EndpointWithSecret,
    RotateSecret,
    delivery_out,
    endpoint_out,
    endpoint_with_secret,
)

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
WebhooksManager = Annotated[Principal, Depends(require("webhooks:manage"))]


@router.post("", status_code=201, response_model=EndpointWithSecret)
def create_endpoint(
    body: EndpointCreate, principal: WebhooksManager, session: SessionDep, settings: SettingsDep, response: Response
) -> EndpointWithSecret:
    """Register a receiver. The answer carries the signing secret, the only time it is shown."""
    endpoint = service.create_endpoint(session, principal.tenant_id, body, settings)
    response.headers["Location"] = f"/v1/webhooks/{endpoint.id}"
    return endpoint_with_secret(endpoint)


@router.get("", response_model=EndpointList)
def list_endpoints(
    principal: WebhooksManager,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> EndpointList:
    endpoints, has_more = service.list_endpoints(session, principal.tenant_id, after, limit)
    return EndpointList(data=[endpoint_out(e) for e in endpoints], has_more=has_more)


@router.get("/{endpoint_id}", response_model=EndpointOut)
def get_endpoint(endpoint_id: str, principal: WebhooksManager, session: SessionDep) -> EndpointOut:
    return endpoint_out(service.get_endpoint(session, principal.tenant_id, endpoint_id))


@router.patch("/{endpoint_id}", response_model=EndpointOut)
def update_endpoint(
    endpoint_id: str, body: EndpointUpdate, principal: WebhooksManager, session: SessionDep, settings: SettingsDep
) -> EndpointOut:
    """Change url, events, description; ``enabled: true`` re-enables an endpoint a 410 disabled."""
    return endpoint_out(service.update_endpoint(session, principal.tenant_id, endpoint_id, body, settings))


@router.delete("/{endpoint_id}", status_code=204)
def delete_endpoint(endpoint_id: str, principal: WebhooksManager, session: SessionDep) -> Response:
    service.delete_endpoint(session, principal.tenant_id, endpoint_id)
    return Response(status_code=204)


@router.post("/{endpoint_id}/rotate-secret", response_model=EndpointWithSecret)
def rotate_secret(
    endpoint_id: str,
    principal: WebhooksManager,
    session: SessionDep,
    settings: SettingsDep,
    body: RotateSecret | None = None,
) -> EndpointWithSecret:
    """A new secret (shown once); the old one keeps signing alongside it for ``overlap_s`` (default 24 h)."""
    overlap = body.overlap_s if body is not None else None
    endpoint = service.rotate_secret(session, principal.tenant_id, endpoint_id, overlap, settings)
    return endpoint_with_secret(endpoint)


@router.get("/{endpoint_id}/deliveries", response_model=DeliveryList)
def list_deliveries(
    endpoint_id: str,
    principal: WebhooksManager,
    session: SessionDep,
    status: Literal["pending", "delivered", "failed"] | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> DeliveryList:
    """Newest first: each delivery with its attempts (status code, latency, error) and next attempt time."""
    rows, has_more = service.list_deliveries(session, principal.tenant_id, endpoint_id, status, after, limit)
    return DeliveryList(data=[delivery_out(d, attempts) for d, attempts in rows], has_more=has_more)


@router.post("/{endpoint_id}/deliveries/{delivery_id}/redeliver", status_code=202, response_model=DeliveryOut)
def redeliver(endpoint_id: str, delivery_id: str, principal: WebhooksManager, session: SessionDep) -> DeliveryOut:
    """Queue a delivered or failed delivery again, with the same ``webhook-id``."""
    delivery = service.redeliver(session, principal.tenant_id, endpoint_id, delivery_id)
    return delivery_out(delivery, service.attempts_of(session, delivery.id))
