"""/healthz is the process's own liveness; /readyz is the dependencies plus the maintenance process's heartbeat,
in both the production (Postgres) and the embedded (SQLite) database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.db import session_scope, utcnow
from app.heartbeats.models import WorkerHeartbeat
from app.heartbeats.service import ROLE_JOBS, ROLE_MAINTENANCE, forget, record_heartbeat


def _beat(hostname: str, role: str, queues: list[str], age_s: float = 0.0) -> None:
    with session_scope() as session:
        record_heartbeat(session, hostname=hostname, role=role, queues=queues, pid=4242, started_at=utcnow())
        if age_s:
            session.execute(
                update(WorkerHeartbeat)
                .where(WorkerHeartbeat.hostname == hostname)
                .values(last_seen=utcnow() - timedelta(seconds=age_s))
            )


@pytest.fixture
def embedded_client(embedded_stack: dict[str, str]) -> Iterator[TestClient]:
    from app.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture(params=["production", "embedded"])
def any_client(request: pytest.FixtureRequest) -> TestClient:
    name = "client" if request.param == "production" else "embedded_client"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


def test_healthz_checks_nothing_else(any_client: TestClient) -> None:
    assert any_client.get("/healthz").json() == {"status": "ok"}


def test_ready_only_with_a_fresh_maintenance_heartbeat(any_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.config import get_settings

    monkeypatch.setenv("MODELPRESS_LIVENESS_STALE_S", "30")
    get_settings.cache_clear()

    nobody = any_client.get("/readyz")
    assert nobody.status_code == 503 and nobody.headers["content-type"] == "application/problem+json"
    assert nobody.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok", "maintenance": "unavailable"}
    assert nobody.json()["detail"] == "not ready: maintenance"

    _beat("maintenance@box", ROLE_MAINTENANCE, ["maintenance"])
    _beat("w0@box", ROLE_JOBS, ["gpu", "cpu"], age_s=5)
    ready = any_client.get("/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ready" and body["checks"]["maintenance"] == "ok"
    [maintenance] = body["maintenance"]
    assert maintenance["alive"] is True and maintenance["last_seen_s"] < 5 and maintenance["queues"] == ["maintenance"]
    [worker] = body["workers"]
    assert worker["role"] == "jobs" and worker["queues"] == ["cpu", "gpu"] and 5 <= worker["last_seen_s"] < 10
    assert "box" not in ready.text  # the probe is unauthenticated: no host names

    # A maintenance process that stopped beating 31 s ago is dead for readiness; a job worker as old is
    # reported stale but does not make the API unready.
    _beat("maintenance@box", ROLE_MAINTENANCE, ["maintenance"], age_s=31)
    stale = any_client.get("/readyz")
    assert stale.status_code == 503
    assert stale.json()["checks"]["maintenance"] == "unavailable"
    assert stale.json()["maintenance"][0]["alive"] is False and stale.json()["maintenance"][0]["last_seen_s"] >= 31

    _beat("maintenance@box", ROLE_MAINTENANCE, ["maintenance"])
    _beat("w0@box", ROLE_JOBS, ["cpu"], age_s=31)
    no_worker = any_client.get("/readyz")
    assert no_worker.status_code == 200
    assert no_worker.json()["workers"][0]["alive"] is False

    with session_scope() as session:  # a cleanly stopped process is gone, not reported dead
        forget(session, "w0@box")
    assert any_client.get("/readyz").json()["workers"] == []


def test_a_dependency_down_is_named(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.broker import get_celery
    from app.config import get_settings

    _beat("maintenance@box", ROLE_MAINTENANCE, ["maintenance"])
    monkeypatch.setenv("MODELPRESS_BROKER_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    get_celery.cache_clear()
    down = client.get("/readyz")
    assert down.status_code == 503 and down.headers["content-type"] == "application/problem+json"
    # Unauthenticated probe: it names the dependency, never hosts or exception text.
    assert down.json()["checks"] == {"database": "ok", "broker": "unavailable", "storage": "ok", "maintenance": "ok"}


def test_heartbeats_of_long_gone_processes_are_forgotten(client: TestClient) -> None:
    _beat("w-old@box", ROLE_JOBS, ["cpu"], age_s=2 * 86400)
    assert len(client.get("/readyz").json()["workers"]) == 1
    _beat("maintenance@box", ROLE_MAINTENANCE, ["maintenance"])  # the maintenance process's beat prunes
    assert client.get("/readyz").json()["workers"] == []
