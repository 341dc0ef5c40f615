"""Shared fixtures: real Postgres, Redis and an S3 server (moto over HTTP) for the service tests; the embedded
stack (SQLite, local storage). The helpers they build on are in :mod:`tests.helpers`.

Migrations run once per session and database kind: Postgres is rebuilt from an empty schema by the migrations
(they are under test too) and then only emptied between tests; the embedded SQLite database is migrated once
and copied into each test's data directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    BUCKET,
    PG_URL,
    SOURCE_BUCKET,
    Stack,
    apply_env,
    empty_postgres,
    free_port,
    migrate_once,
    reset_postgres,
    service_env,
    start_stack,
)


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


@pytest.fixture(scope="session")
def pg_migrated(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The test database rebuilt by the migrations, once per session."""
    reset_postgres()
    migrate_once({"MODELPRESS_DATABASE_URL": PG_URL, "MODELPRESS_DATA_DIR": str(tmp_path_factory.mktemp("pg"))})


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedded (SQLite) database migrated once per session; each test gets a copy of it."""
    base = tmp_path_factory.mktemp("sqlite-template")
    migrate_once(service_env(base, stack="embedded"))
    return base / "var" / "modelpress.db"


@pytest.fixture
def pg_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_endpoint: str, pg_migrated: None
) -> Iterator[dict[str, str]]:
    """Postgres + Redis + S3 configured for this process, schema migrated, tables and Redis emptied."""
    empty_postgres()
    env = service_env(tmp_path, stack="production", s3_endpoint=s3_endpoint)
    apply_env(monkeypatch, env)
    yield env
    from app.db import reset_caches

    reset_caches()


@pytest.fixture
def embedded_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sqlite_template: Path) -> Iterator[dict[str, str]]:
    """The embedded stack (SQLite, local storage, file broker) in this test's directory, already migrated."""
    env = service_env(tmp_path, stack="embedded")
    (tmp_path / "var").mkdir()
    shutil.copyfile(sqlite_template, tmp_path / "var" / "modelpress.db")
    apply_env(monkeypatch, env)
    yield env
    from app.db import reset_caches

    reset_caches()


@pytest.fixture
def production_stack(tmp_path: Path, s3_endpoint: str, pg_migrated: None) -> Iterator[Stack]:
    """The API, the maintenance worker (and job workers a test starts) as processes, against Postgres, Redis
    and the S3 server."""
    empty_postgres()
    yield from start_stack(tmp_path, service_env(tmp_path, stack="production", s3_endpoint=s3_endpoint))


@pytest.fixture
def embedded_stack_procs(tmp_path: Path) -> Iterator[Stack]:
    """The same processes in the embedded mode: SQLite, local storage, file-system broker (what `make dev` runs)."""
    yield from start_stack(tmp_path, service_env(tmp_path, stack="embedded"))
