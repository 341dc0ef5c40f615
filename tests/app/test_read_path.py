"""A read is cheap: ``GET /v1/jobs/{id}`` costs two queries (the key, the job with its metadata) and no
COMMIT, while a revoked key is refused on the very next request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from tests.helpers import Caller, quantize_job, upload_files


@pytest.fixture
def statements(client: TestClient) -> Iterator[dict[str, list[Any]]]:
    from app.db import get_engine

    seen: dict[str, list[Any]] = {"sql": [], "commits": []}

    def on_execute(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        seen["sql"].append(sql)

    def on_commit(conn: Any) -> None:
        seen["commits"].append(conn)

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", on_execute)
    event.listen(engine, "commit", on_commit)
    yield seen
    event.remove(engine, "before_cursor_execute", on_execute)
    event.remove(engine, "commit", on_commit)


def test_job_read_is_two_queries_and_no_commit(
    client: TestClient, alice: Caller, statements: dict[str, list[Any]]
) -> None:
    upload_id = upload_files(client, alice.headers, {"config.json": b"{}"})
    spec = quantize_job(upload_id, metadata={"team": "search", "run": "7"})
    job_id = client.post("/v1/jobs", json=spec, headers=alice.headers).json()["id"]
    client.get(f"/v1/jobs/{job_id}", headers=alice.headers)  # last_used_at was just written; reads follow
    statements["sql"].clear()
    statements["commits"].clear()

    response = client.get(f"/v1/jobs/{job_id}", headers=alice.headers)
    assert response.status_code == 200 and response.json()["metadata"] == {"run": "7", "team": "search"}
    assert len(statements["sql"]) == 2, statements["sql"]  # the key (with its tenant's limit), the job
    assert statements["commits"] == []


def test_revoked_key_is_refused_on_the_next_request(client: TestClient, alice: Caller) -> None:
    from app.auth.service import create_key, revoke_key
    from app.db import session_scope

    with session_scope() as session:
        key, clear = create_key(session, alice.tenant_id, "short-lived")
    headers = {"Authorization": f"Bearer {clear}"}
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    with session_scope() as session:
        assert revoke_key(session, key.id)
    assert client.get("/v1/jobs", headers=headers).status_code == 401
