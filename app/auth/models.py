"""Tenants and their API keys (stored hashed)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, utcnow
from app.ids import new_id


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ten"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Quotas (null = the operator default in app/config.py, ``quota_*`` settings).
    max_running_jobs: Mapped[int | None]
    max_queued_jobs: Mapped[int | None]
    # Bytes of uploads the tenant may declare per rolling 24 hours (not the size of one upload).
    max_upload_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # API requests per minute for each of the tenant's keys.
    rate_limit_per_minute: Mapped[int | None]
    # 0 (lowest) … 9 (highest): the order in which queued jobs reach workers.
    priority: Mapped[int | None]


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    # The public part shown in listings ("mp_live_ab12…"); the secret is only ever stored as a hash.
    prefix: Mapped[str] = mapped_column(String(32), index=True)
    secret_hash: Mapped[str] = mapped_column(String(128), unique=True)
    scopes: Mapped[list[Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
