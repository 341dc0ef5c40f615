"""HTTP routes of API keys, limits and the operator's admin API. Thin: parse, call the service, shape.

- ``/v1/keys`` (scope ``keys:manage``): a tenant manages its own keys; a new key may carry only scopes the
  calling key has (see :func:`app.auth.service.create_own_key`).
- ``/v1/limits`` (any key): the tenant's effective limits and current usage.
- ``/v1/admin/…`` (scope ``admin``): tenants, their quotas and keys, across tenants.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from app.auth import quotas, service
from app.auth.schemas import (
    KeyCreate,
    KeyCreated,
    KeyList,
    TenantCreate,
    TenantLimits,
    TenantList,
    TenantOut,
    TenantUpdate,
    key_created,
    key_out,
    tenant_limits,
    tenant_out,
)
from app.deps import Admin, AnyPrincipal, KeysManager, SessionDep, SettingsDep
from app.errors import not_found

router = APIRouter(prefix="/v1", tags=["keys"])
admin_router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.get("/keys", response_model=KeyList)
def list_own_keys(principal: KeysManager, session: SessionDep, include_revoked: bool = False) -> KeyList:
    """This tenant's keys with their public prefix; the secret is never stored, so never shown."""
    keys = service.list_keys(session, principal.tenant_id, include_revoked)
    return KeyList(data=[key_out(k) for k in keys])


@router.post("/keys", status_code=201, response_model=KeyCreated)
def create_own_key(body: KeyCreate, principal: KeysManager, session: SessionDep) -> KeyCreated:
    """A new key for this tenant, with a subset of the calling key's scopes. The ``key`` is shown only here."""
    key, clear = service.create_own_key(session, principal, body.name, list(body.scopes))
    session.commit()
    return key_created(key, clear)


@router.delete("/keys/{key_id}", status_code=204)
def revoke_own_key(key_id: str, principal: KeysManager, session: SessionDep) -> Response:
    """Revoke one of this tenant's keys; it fails on its very next request."""
    if not service.revoke_key(session, key_id, principal.tenant_id):
        raise not_found("api key", key_id)
    session.commit()
    return Response(status_code=204)


@router.get("/limits", response_model=TenantLimits, tags=["limits"])
def get_limits(principal: AnyPrincipal, session: SessionDep, settings: SettingsDep) -> TenantLimits:
    """This tenant's effective limits (overrides or operator defaults) and what it uses now."""
    tenant = service.get_tenant(session, principal.tenant_id)
    limits = quotas.limits_of(tenant, settings)
    return tenant_limits(tenant.id, limits, quotas.usage(session, tenant.id))


@admin_router.post("/tenants", status_code=201, response_model=TenantOut)
def admin_create_tenant(body: TenantCreate, _admin: Admin, session: SessionDep, settings: SettingsDep) -> TenantOut:
    overrides = body.model_dump(exclude={"name"}, exclude_none=True)
    tenant = service.create_tenant(session, body.name, **overrides)
    session.commit()
    return tenant_out(tenant, quotas.limits_of(tenant, settings))


@admin_router.get("/tenants", response_model=TenantList)
def admin_list_tenants(
    _admin: Admin,
    session: SessionDep,
    settings: SettingsDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
) -> TenantList:
    tenants, has_more = service.list_tenants(session, after, limit)
    return TenantList(data=[tenant_out(t, quotas.limits_of(t, settings)) for t in tenants], has_more=has_more)


@admin_router.get("/tenants/{tenant_id}", response_model=TenantOut)
def admin_get_tenant(tenant_id: str, _admin: Admin, session: SessionDep, settings: SettingsDep) -> TenantOut:
    tenant = service.get_tenant(session, tenant_id)
    return tenant_out(tenant, quotas.limits_of(tenant, settings))


@admin_router.patch("/tenants/{tenant_id}", response_model=TenantOut)
def admin_update_tenant(
    tenant_id: str, body: TenantUpdate, _admin: Admin, session: SessionDep, settings: SettingsDep
) -> TenantOut:
    """Change quota overrides; only the fields sent change, null returns one to the operator default."""
    tenant = service.update_tenant(session, tenant_id, body.model_dump(exclude_unset=True))
    session.commit()
    return tenant_out(tenant, quotas.limits_of(tenant, settings))


@admin_router.post("/tenants/{tenant_id}/keys", status_code=201, response_model=KeyCreated)
def admin_create_key(tenant_id: str, body: KeyCreate, _admin: Admin, session: SessionDep) -> KeyCreated:
    """A key for any tenant, with any scopes. The ``key`` is shown only in this response."""
    service.get_tenant(session, tenant_id)
    key, clear = service.create_key(session, tenant_id, body.name, list(body.scopes))
    session.commit()
    return key_created(key, clear)


@admin_router.get("/tenants/{tenant_id}/keys", response_model=KeyList)
def admin_list_keys(tenant_id: str, _admin: Admin, session: SessionDep, include_revoked: bool = False) -> KeyList:
    service.get_tenant(session, tenant_id)
    return KeyList(data=[key_out(k) for k in service.list_keys(session, tenant_id, include_revoked)])


@admin_router.delete("/keys/{key_id}", status_code=204)
def admin_revoke_key(key_id: str, _admin: Admin, session: SessionDep) -> Response:
    if not service.revoke_key(session, key_id):
        raise not_found("api key", key_id)
    session.commit()
    return Response(status_code=204)
