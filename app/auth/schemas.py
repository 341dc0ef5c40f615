"""Public shapes of tenants, API keys and limits. A key's secret appears only in :class:`KeyCreated`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.auth.models import ApiKey, Tenant
from app.auth.quotas import Limits
from app.auth.service import DEFAULT_SCOPES
from app.db import INT32_MAX, JSON_INT_MAX

Scope = Literal["jobs:read", "jobs:write", "webhooks:manage", "keys:manage", "admin"]


class QuotaOverrides(BaseModel):
    """Per-tenant overrides; null (or absent at creation) means the operator default."""

    model_config = ConfigDict(extra="forbid", strict=True)  # strict: `false` is not a quota of 0

    # Upper bounds: the database columns' (INTEGER, BIGINT); past them an operator gets a 422, not a 500.
    max_running_jobs: int | None = Field(default=None, ge=1, le=INT32_MAX, description="jobs running at once")
    max_queued_jobs: int | None = Field(default=None, ge=1, le=INT32_MAX, description="jobs waiting in the queue")
    max_upload_bytes: int | None = Field(
        default=None, ge=1, le=JSON_INT_MAX, description="upload bytes per rolling 24 hours"
    )
    rate_limit_per_minute: int | None = Field(
        default=None, ge=1, le=INT32_MAX, description="requests per minute per key"
    )
    priority: int | None = Field(default=None, ge=0, le=9, description="0 (lowest) … 9 (highest)")


class TenantCreate(QuotaOverrides):
    name: str = Field(min_length=1, max_length=200)


class TenantUpdate(QuotaOverrides):
    """PATCH: only the fields sent change; send null to return a quota to the operator default."""


class LimitsOut(BaseModel):
    max_running_jobs: int
    max_queued_jobs: int
    max_upload_bytes_per_day: int
    requests_per_minute: int
    priority: int


class TenantOut(BaseModel):
    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    created_at: datetime
    overrides: QuotaOverrides
    limits: LimitsOut

    @classmethod
    def of(cls, tenant: Tenant, limits: Limits) -> TenantOut:
        overrides = {field: getattr(tenant, field) for field in QuotaOverrides.model_fields}
        return cls(
            id=tenant.id,
            name=tenant.name,
            created_at=tenant.created_at,
            overrides=QuotaOverrides(**overrides),
            limits=LimitsOut(**limits.as_dict()),
        )


class TenantList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TenantOut]
    has_more: bool


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="default", min_length=1, max_length=200)
    scopes: list[Scope] = Field(default_factory=lambda: list(DEFAULT_SCOPES), min_length=1)  # type: ignore[arg-type]


class KeyOut(BaseModel):
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

    @classmethod
    def of(cls, key: ApiKey) -> KeyOut:
        return cls(
            id=key.id,
            tenant_id=key.tenant_id,
            name=key.name,
            prefix=key.prefix,
            scopes=list(key.scopes),
            created_at=key.created_at,
            last_used_at=key.last_used_at,
            revoked_at=key.revoked_at,
        )


class KeyCreated(KeyOut):
    key: str = Field(description="the full key: shown this once, store it now")

    @classmethod
    def created(cls, key: ApiKey, clear: str) -> KeyCreated:
        return cls(**KeyOut.of(key).model_dump(), key=clear)


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyOut]


class UsageOut(BaseModel):
    running_jobs: int
    queued_jobs: int
    upload_bytes_last_24h: int


class TenantLimits(BaseModel):
    object: Literal["limits"] = "limits"
    tenant_id: str
    limits: LimitsOut
    usage: UsageOut

    @classmethod
    def of(cls, tenant_id: str, limits: Limits, usage: dict[str, Any]) -> TenantLimits:
        return cls(tenant_id=tenant_id, limits=LimitsOut(**limits.as_dict()), usage=UsageOut(**usage))
