"""A read is cheap: ``GET /v1/jobs/{id}`` costs two statements on the request engine (the key with its
tenant's limit, the job with its metadata), no transaction and no thread-pool hop; so do the reads a client
or the console repeats (the job list, a job's events, every poll of its event stream), with one statement
more each. A revoked key is refused on the very next request."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from tests.helpers import Caller, quantize_job, upload_files


@pytest.fixture
def statements(client: TestClient) -> Iterator[dict[str, list[Any]]]:
    """What the request engine and the ORM engine run, and on which thread."""
    from app.db import get_engine

    seen: dict[str, list[Any]] = {"request": [], "orm": []}

    def recorder(kind: str) -> Any:
        def on_execute(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
            # autocommit: the driver sends the statement alone, with no BEGIN before it (nor ROLLBACK after)
            autocommit = conn.connection.dbapi_connection.autocommit
            seen[kind].append((sql, threading.current_thread().name, autocommit))

        return on_execute

    request_engine = client.app.state.request_path.engine.sync_engine  # type: ignore[attr-defined]
    listeners = [
        (request_engine, "before_cursor_execute", recorder("request")),
        (get_engine(), "before_cursor_execute", recorder("orm")),
    ]
    for target, name, fn in listeners:
        event.listen(target, name, fn)
    yield seen
    for target, name, fn in listeners:
        event.remove(target, name, fn)


def test_job_read_is_two_statements_on_the_event_loop(
    client: TestClient, alice: Caller, statements: dict[str, list[Any]]
) -> None:
    upload_id = upload_files(client, alice.headers, {"config.json": b"{}"})
    spec = quantize_job(upload_id, metadata={"team": "search", "run": "7"})
    job_id = client.post("/v1/jobs", json=spec, headers=alice.headers).json()["id"]
    client.get(f"/v1/jobs/{job_id}", headers=alice.headers)  # last_used_at was just written; reads follow
    for recorded in statements.values():
        recorded.clear()

    response = client.get(f"/v1/jobs/{job_id}", headers=alice.headers)
    assert response.status_code == 200 and response.json()["metadata"] == {"run": "7", "team": "search"}
    assert list(response.json()["metadata"]) == ["run", "team"]  # sorted by key, as in every read of a job
    assert len(statements["request"]) == 2, statements["request"]  # the key (with its tenant's limit), the job
    assert statements["orm"] == []
    assert all(autocommit for _, _, autocommit in statements["request"])
    # Both ran on the event loop's thread, not in the thread pool that runs sync routes and dependencies.
    assert [thread for _, thread, _ in statements["request"] if thread == "AnyIO worker thread"] == []


def _on_the_event_loop(recorded: list[Any]) -> bool:
    return all(autocommit and thread != "AnyIO worker thread" for _, thread, autocommit in recorded)


def test_the_polled_reads_run_on_the_event_loop(
    client: TestClient, alice: Caller, statements: dict[str, list[Any]]
) -> None:
    upload_id = upload_files(client, alice.headers, {"config.json": b"{}"})
    job_ids = [
        client.post(
            "/v1/jobs", json=quantize_job(upload_id, metadata={"team": "search", "run": str(i)}), headers=alice.headers
        ).json()["id"]
        for i in range(3)
    ]
    client.get("/v1/jobs", headers=alice.headers)  # last_used_at was just written; reads follow

    reads = {
        "list": ("/v1/jobs?limit=2", 3),  # the key, the page of jobs, their metadata
        "events": (f"/v1/jobs/{job_ids[0]}/events", 3),  # the key, the job's status, its events
    }
    for name, (url, expected) in reads.items():
        for recorded in statements.values():
            recorded.clear()
        response = client.get(url, headers=alice.headers)
        assert response.status_code == 200, response.text
        assert len(statements["request"]) == expected, (name, statements["request"])
        assert statements["orm"] == [] and _on_the_event_loop(statements["request"]), name
        if name == "list":
            page = response.json()
            assert [j["id"] for j in page["data"]] == job_ids[:0:-1] and page["has_more"] is True
            assert [list(j["metadata"].items()) for j in page["data"]] == [
                [("run", "2"), ("team", "search")],
                [("run", "1"), ("team", "search")],
            ]
        else:
            assert [e["type"] for e in response.json()["data"]] == ["job.queued"]


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
