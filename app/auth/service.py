"""Tenants and API keys. Keys are shown once; only their SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Row, Select, Update, bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from app.auth.models import ApiKey, Tenant
from app.db import utcnow
from app.errors import Problem, conflict, not_found

# ``keys:manage``: list, create and revoke the keys of one's own tenant (self-service, see create_own_key).
# ``admin``: the operator — every scope, every tenant (/v1/admin/…).
ALL_SCOPES = ("jobs:read", "jobs:write", "webhooks:manage", "keys:manage", "admin")
DEFAULT_SCOPES = ["jobs:read", "jobs:write", "webhooks:manage"]
KEY_PREFIX = "mp_live_"
# Tenant columns an operator may change with PATCH /v1/admin/tenants/{id} (null = the operator default).
QUOTA_FIELDS = ("max_running_jobs", "max_queued_jobs", "max_upload_bytes", "rate_limit_per_minute", "priority")

T = TypeVar("T")


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant and the scopes of the key used."""

    tenant_id: str
    key_id: str
    scopes: frozenset[str]
    # The tenant's request-rate override (None: the operator default), read with the key in one query.
    rate_limit_per_minute: int | None = None


def scoped(model: type[T], tenant_id: str) -> Select[T]:
    """``SELECT model WHERE tenant_id = …``: the one way to read a tenant-owned row, so no query forgets it."""
    return select(model).where(model.tenant_id == tenant_id)  # type: ignore[attr-defined]


def hash_secret(secret: str) -> str:
    # Keys carry 256 bits of randomness, so a fast hash is enough (no password stretching needed).
    return hashlib.sha256(secret.encode()).hexdigest()


def create_tenant(session: Session, name: str, **quotas: Any) -> Tenant:
    """Insert a tenant (quota overrides optional); a taken name raises 409."""
    unknown = set(quotas) - set(QUOTA_FIELDS)
    if unknown:
        raise ValueError(f"unknown tenant fields: {sorted(unknown)}")
    tenant = Tenant(name=name, **quotas)
    session.add(tenant)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError as exc:
        raise conflict(f"a tenant named {name!r} already exists") from exc
    return tenant


def get_tenant(session: Session, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise not_found("tenant", tenant_id)
    return tenant


def list_tenants(session: Session, after: str | None, limit: int) -> tuple[list[Tenant], bool]:
    """Oldest first (ids are time-ordered); ``after`` is the last id of the previous page."""
    stmt = select(Tenant).order_by(Tenant.id)
    if after:
        stmt = stmt.where(Tenant.id > after)
    rows = list(session.execute(stmt.limit(limit + 1)).scalars())
    return rows[:limit], len(rows) > limit


def update_tenant(session: Session, tenant_id: str, changes: dict[str, Any]) -> Tenant:
    """Set quota overrides; a None value returns that quota to the operator default."""
    tenant = get_tenant(session, tenant_id)
    for field, value in changes.items():
        if field not in QUOTA_FIELDS:
            raise ValueError(f"not a tenant quota: {field}")
        setattr(tenant, field, value)
    session.flush()
    return tenant


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.execute(select(Tenant).where(Tenant.name == name)).scalar_one_or_none()
    return tenant or create_tenant(session, name)


def create_key(
    session: Session, tenant_id: str, name: str, scopes: list[str] | None = None, secret: str | None = None
) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the clear-text key (shown once, never stored)."""
    scopes = list(dict.fromkeys(scopes or DEFAULT_SCOPES))  # de-duplicated, order kept
    unknown = set(scopes) - set(ALL_SCOPES)
    if unknown:
        raise ValueError(f"unknown scopes: {sorted(unknown)}")
    clear = secret or KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(tenant_id=tenant_id, name=name, prefix=clear[:16], secret_hash=hash_secret(clear), scopes=scopes)
    session.add(key)
    session.flush()
    return key, clear


def create_own_key(session: Session, principal: Principal, name: str, scopes: list[str]) -> tuple[ApiKey, str]:
    """Self-service (``keys:manage``): a key for the caller's own tenant with no scope the caller lacks.

    The subset rule means a key can never mint a more powerful key; ``admin`` is therefore only
    ever granted by an admin (operator) key.
    """
    if "admin" not in principal.scopes:
        missing = sorted(set(scopes) - principal.scopes)
        if missing:
            raise Problem(403, "Forbidden", f"a key cannot grant scopes it lacks: {', '.join(missing)}")
    return create_key(session, principal.tenant_id, name, scopes)


def list_keys(session: Session, tenant_id: str, include_revoked: bool = False) -> list[ApiKey]:
    stmt = scoped(ApiKey, tenant_id).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        stmt = stmt.where(ApiKey.revoked_at.is_(None))
    return list(session.execute(stmt).scalars())


# The key behind a clear-text secret, with its tenant's request-rate override: one statement.
_KEY_LOOKUP = (
    select(ApiKey.id, ApiKey.tenant_id, ApiKey.scopes, ApiKey.last_used_at, Tenant.rate_limit_per_minute)
    .join(Tenant, Tenant.id == ApiKey.tenant_id)
    .where(ApiKey.secret_hash == bindparam("secret_hash"), ApiKey.revoked_at.is_(None))
)
# Coarse last-used tracking: at most one write a minute per key; every other request only reads.
LAST_USED_RESOLUTION_S = 60


def _touch(row: Row[Any]) -> Update | None:
    now = utcnow()
    if row.last_used_at is None or (now - row.last_used_at).total_seconds() > LAST_USED_RESOLUTION_S:
        return update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now)
    return None


def _principal(row: Row[Any]) -> Principal:
    return Principal(
        tenant_id=row.tenant_id,
        key_id=row.id,
        scopes=frozenset(row.scopes),
        rate_limit_per_minute=row.rate_limit_per_minute,
    )


async def authenticate(engine: AsyncEngine, clear: str) -> Principal | None:
    """The caller behind an API key, None when it is unknown or revoked: what every API request does
    first, on the request engine (no thread hop, no transaction). Revocation takes effect on the very
    next request: nothing is cached."""
    async with engine.connect() as conn:
        row = (await conn.execute(_KEY_LOOKUP, {"secret_hash": hash_secret(clear)})).one_or_none()
        if row is None:
            return None
        touch = _touch(row)
        if touch is not None:
            await conn.execute(touch)
    return _principal(row)


def revoke_key(session: Session, key_id: str, tenant_id: str | None = None) -> bool:
    """Revoke an active key (of ``tenant_id`` only, when given); False if there is none. Effective at once:
    every request looks the key up again."""
    stmt = update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
    if tenant_id is not None:
        stmt = stmt.where(ApiKey.tenant_id == tenant_id)
    return bool(session.execute(stmt.values(revoked_at=utcnow())).rowcount)  # type: ignore[attr-defined]


def ensure_bootstrap_key(session: Session, clear: str) -> None:
    """Dev convenience: make ``clear`` a key of the 'default' tenant (idempotent)."""
    exists = session.execute(select(ApiKey.id).where(ApiKey.secret_hash == hash_secret(clear))).first()
    if exists is None:
        tenant = get_or_create_tenant(session, "default")
        create_key(session, tenant.id, "bootstrap", list(ALL_SCOPES), secret=clear)
