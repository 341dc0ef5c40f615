"""An outage is not a bug: the API answers 503 + Retry-After (problem+json) when the database, broker or
storage cannot be reached, and jobs created while the broker is down are rung as soon as it is back.

Every outage here is a real refused connection: a dependency's URL points at a loopback port nobody
listens on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.helpers import (
    REDIS_URL,
    Caller,
    apply_env,
    free_port,
    make_caller,
    quantize_job,
    service_env,
    sha256_bytes,
    upload_files,
)


def _closed_port() -> int:
    return free_port()  # bound, then released: nothing listens there


def _assert_unavailable(response: object, dependency: str) -> None:
    assert response.status_code == 503, response.text  # type: ignore[attr-defined]
    assert response.headers["content-type"] == "application/problem+json"  # type: ignore[attr-defined]
    assert int(response.headers["retry-after"]) >= 1  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert body["status"] == 503 and body["title"] == "Service Unavailable"
    assert body["dependency"] == dependency


@pytest.fixture
def db_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_endpoint: str) -> Iterator[TestClient]:
    env = service_env(tmp_path, stack="production", s3_endpoint=s3_endpoint)
    env["MODELPRESS_DATABASE_URL"] = f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/nothing"
    apply_env(monkeypatch, env)
    from app.main import create_app

    with TestClient(create_app()) as client:
        yield client
    from app.db import reset_caches

    reset_caches()


def test_database_down_is_503_with_retry_after(db_down: TestClient) -> None:
    headers = {"Authorization": "Bearer mp_live_whatever"}
    _assert_unavailable(db_down.get("/v1/jobs/job_x", headers=headers), "database")
    _assert_unavailable(db_down.get("/v1/jobs", headers=headers), "database")
    _assert_unavailable(
        db_down.post("/v1/webhooks", json={"url": "https://example.com/h"}, headers=headers), "database"
    )


def test_storage_down_is_503_not_a_verification_failure(
    client: TestClient, alice: Caller, monkeypatch: pytest.MonkeyPatch, pg_stack: dict[str, str]
) -> None:
    data = b"weights"
    body = {"files": [{"path": "model.safetensors", "size": len(data), "sha256": sha256_bytes(data)}]}
    created = client.post("/v1/uploads", json=body, headers=alice.headers)
    assert created.status_code == 201, created.text
    apply_env(monkeypatch, {**pg_stack, "MODELPRESS_S3_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}"})
    # Not "file was not uploaded" (422): the storage did not answer, it did not say the file is missing.
    _assert_unavailable(client.post(f"/v1/uploads/{created.json()['id']}/complete", headers=alice.headers), "storage")
    # A large file starts a multipart upload in S3 at declare time.
    big = {"files": [{"path": "big.safetensors", "size": 200 * 1024**2, "sha256": "0" * 64}]}
    _assert_unavailable(client.post("/v1/uploads", json=big, headers=alice.headers), "storage")


@pytest.mark.parametrize("client_kind", ["redis", "kombu"])
def test_broker_errors_are_503(client_kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The handlers map the broker's connection errors, as raised by the real clients, to 503."""
    from app.errors import install_error_handlers

    closed = f"redis://127.0.0.1:{_closed_port()}/0"
    apply_env(monkeypatch, service_env(tmp_path, stack="embedded"))
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/ring")
    def ring() -> None:
        if client_kind == "redis":
            redis.Redis.from_url(closed, socket_connect_timeout=1).ping()
        else:
            from celery import Celery

            with Celery(broker=closed).connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=1)

    with TestClient(app) as test_client:
        _assert_unavailable(test_client.get("/ring"), "broker")


def test_job_created_while_broker_down_is_rung_on_the_next_reaper_pass(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, pg_stack: dict[str, str]
) -> None:
    from workers.reaper import reap_once

    caller = make_caller("offline")
    upload_id = upload_files(client, caller.headers, {"config.json": b"{}"})
    queues = redis.Redis.from_url(REDIS_URL)
    queues.flushdb()

    apply_env(monkeypatch, {**pg_stack, "MODELPRESS_BROKER_URL": f"redis://127.0.0.1:{_closed_port()}/9"})
    created = client.post("/v1/jobs", json=quantize_job(upload_id), headers=caller.headers)
    assert created.status_code == 201, created.text  # the job is safe in Postgres; the doorbell failed
    # The reaper with the broker still down rings nothing, and keeps the job marked.
    assert reap_once().get("unrung") == 1
    assert not queues.keys("cpu*")

    apply_env(monkeypatch, pg_stack)  # the broker answers again
    counts = reap_once()  # the next pass, seconds later, not requeue_stale_queued_s (300 s) later
    assert counts["resent"] == 1 and "unrung" not in counts
    assert sum(queues.llen(key) for key in queues.keys("cpu*")) == 1
    assert reap_once()["resent"] == 0  # rung once: the job is fresh again
    assert client.get(f"/v1/jobs/{created.json()['id']}", headers=caller.headers).json()["status"] == "queued"
