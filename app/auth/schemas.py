"""The keys, limits and admin APIs' request bodies, and their responses built from rows. The response shapes
(and :class:`QuotaOverrides`, a request body the server also echoes) are the shared wire models
(:mod:`modelpress.schemas`). A key's secret appears only in :class:`KeyCreated`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.auth.models import ApiKey, Tenant
from app.auth.quotas import Limits
from app.auth.service import DEFAULT_SCOPES
from modelpress.schemas import (
    KeyCreated,
    KeyList,
    KeyOut,
    LimitsOut,
    QuotaOverrides,
    TenantLimits,
    TenantList,
    TenantOut,
    UsageOut,
)

__all__ = [
    "KeyCreate",
    "KeyCreated",
    "KeyList",
    "KeyOut",
    "QuotaOverrides",
    "Scope",
    "TenantCreate",
    "TenantLimits",
    "TenantList",
    "TenantOut",
    "TenantUpdate",
    "key_created",
    "key_out",
    "tenant_limits",
    "tenant_out",
]

Scope = Literal["jobs:read", "jobs:write", "webhooks:manage", "keys:manage", "admin"]


class TenantCreate(QuotaOverrides):
    name: str = Field(min_length=1, max_length=200)


class TenantUpdate(QuotaOverrides):
    """PATCH: only the fields sent change; send null to return a quota to the operator default."""


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="default", min_length=1, max_length=200)
    scopes: list[Scope] = Field(default_factory=lambda: list(DEFAULT_SCOPES), min_length=1)  # type: ignore[arg-type]


def tenant_out(tenant: Tenant, limits: Limits) -> TenantOut:
    return TenantOut(
        id=tenant.id,
        name=tenant.name,
        created_at=tenant.created_at,
        overrides=QuotaOverrides.model_validate(tenant, from_attributes=True),
        limits=LimitsOut(**limits.as_dict()),
    )


def key_out(key: ApiKey) -> KeyOut:
    return KeyOut.model_validate(key, from_attributes=True)


def key_created(key: ApiKey, clear: str) -> KeyCreated:
    """A new key with its secret, ``clear``: the only answer that carries it."""
    return KeyCreated(**key_out(key).model_dump(), key=clear)


def tenant_limits(tenant_id: str, limits: Limits, usage: dict[str, Any]) -> TenantLimits:
    return TenantLimits(tenant_id=tenant_id, limits=LimitsOut(**limits.as_dict()), usage=UsageOut(**usage))
