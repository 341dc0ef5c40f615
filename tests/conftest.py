"""Shared fixtures: real Postgres, Redis and an S3 server (moto over HTTP) for the service tests."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_URL = os.environ.get("TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
BUCKET = "modelpress-test"
SOURCE_BUCKET = "customer-models"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible HTTP server on loopback, with the service and a customer bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for bucket in (BUCKET, SOURCE_BUCKET):
        client.create_bucket(Bucket=bucket)
    yield endpoint
    server.stop()


def service_env(tmp_path: Path, *, stack: str, s3_endpoint: str | None = None) -> dict[str, str]:
    """Environment for ModelPress processes: ``production`` (Postgres, Redis, S3) or ``embedded``."""
    env = {
        "MODELPRESS_ENVIRONMENT": "test",
        "MODELPRESS_DATA_DIR": str(tmp_path / "var"),
        "MODELPRESS_SIGNING_SECRET": "test-signing-secret",
        "MODELPRESS_LEASE_S": "4",
        "MODELPRESS_HEARTBEAT_S": "1",
        "MODELPRESS_REAPER_INTERVAL_S": "1",
        "MODELPRESS_MAX_ATTEMPTS": "3",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    if stack == "production":
        assert s3_endpoint is not None
        env.update(
            {
                "MODELPRESS_DATABASE_URL": PG_URL,
                "MODELPRESS_BROKER_URL": REDIS_URL,
                "MODELPRESS_STORAGE_BACKEND": "s3",
                "MODELPRESS_S3_BUCKET": BUCKET,
                "MODELPRESS_S3_ENDPOINT_URL": s3_endpoint,
                "MODELPRESS_ALLOWED_SOURCE_BUCKETS": f'["{SOURCE_BUCKET}"]',
            }
        )
    return env


def reset_postgres() -> None:
    """Drop everything in the test database and migrate from scratch (the migrations are under test too)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def apply_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    from app.broker import get_celery
    from app.config import get_settings
    from app.db import reset_caches
    from app.storage import get_storage

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    reset_caches()
    get_storage.cache_clear()
    get_celery.cache_clear()


def migrate() -> None:
    from app.cli import cmd_migrate

    cmd_migrate(None)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pg_migrated() -> None:
    reset_postgres()


@pytest.fixture
def pg_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_endpoint: str, pg_migrated: None
) -> Iterator[dict[str, str]]:
    """Postgres + Redis + S3 configured for this process, schema migrated, tables emptied."""
    import redis
    from sqlalchemy import text

    env = service_env(tmp_path, stack="production", s3_endpoint=s3_endpoint)
    apply_env(monkeypatch, env)
    migrate()
    from app.db import get_engine

    with get_engine().begin() as conn:
        conn.execute(
            text(
                "TRUNCATE tenants, api_keys, uploads, jobs, job_events, job_metadata, idempotency_keys, "
                "webhook_endpoints, webhook_deliveries, webhook_attempts, worker_heartbeats CASCADE"
            )
        )
    redis.Redis.from_url(REDIS_URL).flushdb()
    yield env
    from app.db import reset_caches

    reset_caches()


@pytest.fixture
def embedded_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    env = service_env(tmp_path, stack="embedded")
    apply_env(monkeypatch, env)
    migrate()
    yield env
    from app.db import reset_caches

    reset_caches()
