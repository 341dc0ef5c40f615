"""Tenants and API keys. Keys are shown once; only their SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.auth.models import ApiKey, Tenant
from app.db import utcnow

ALL_SCOPES = ("jobs:read", "jobs:write", "webhooks:manage", "admin")
DEFAULT_SCOPES = ["jobs:read", "jobs:write", "webhooks:manage"]
KEY_PREFIX = "mp_live_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant and the scopes of the key used."""

    tenant_id: str
    key_id: str
    scopes: frozenset[str]


def hash_secret(secret: str) -> str:
    # Keys carry 256 bits of randomness, so a fast hash is enough (no password stretching needed).
    return hashlib.sha256(secret.encode()).hexdigest()


def create_tenant(session: Session, name: str) -> Tenant:
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    return tenant


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.execute(select(Tenant).where(Tenant.name == name)).scalar_one_or_none()
    return tenant or create_tenant(session, name)


def create_key(
    session: Session, tenant_id: str, name: str, scopes: list[str] | None = None, secret: str | None = None
) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the clear-text key (shown once, never stored)."""
    scopes = scopes or list(DEFAULT_SCOPES)
    unknown = set(scopes) - set(ALL_SCOPES)
    if unknown:
        raise ValueError(f"unknown scopes: {sorted(unknown)}")
    clear = secret or KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(tenant_id=tenant_id, name=name, prefix=clear[:16], secret_hash=hash_secret(clear), scopes=scopes)
    session.add(key)
    session.flush()
    return key, clear


def authenticate(session: Session, clear: str) -> Principal | None:
    key = session.execute(
        select(ApiKey).where(ApiKey.secret_hash == hash_secret(clear), ApiKey.revoked_at.is_(None))
    ).scalar_one_or_none()
    if key is None:
        return None
    now = utcnow()
    # Coarse last-used tracking: at most one write a minute per key.
    if key.last_used_at is None or (now - key.last_used_at).total_seconds() > 60:
        session.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
    return Principal(tenant_id=key.tenant_id, key_id=key.id, scopes=frozenset(key.scopes))


def revoke_key(session: Session, key_id: str, tenant_id: str | None = None) -> bool:
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
