"""One row per worker process (keyed by its Celery node name), rewritten every few seconds while it lives."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base


class WorkerHeartbeat(Base):
    __tablename__ = "worker_heartbeats"

    # Celery's node name (``w1@host``): unique among live workers, kept by a restarted one.
    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    role: Mapped[str] = mapped_column(String(32))  # "jobs" | "maintenance"
    queues: Mapped[list[Any]] = mapped_column()
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column()
    last_seen: Mapped[datetime] = mapped_column(index=True)
