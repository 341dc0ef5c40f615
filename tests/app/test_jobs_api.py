"""The jobs API against Postgres, Redis and the S3 server."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.helpers import Caller, quantize_job, reap_with_sight, upload_files


def _model_upload(client: TestClient, caller: Caller) -> str:
    return upload_files(client, caller.headers, {"config.json": b"{}", "model.safetensors": b"\x00" * 64})


def test_create_get_and_list_job(client: TestClient, alice: Caller) -> None:
    upload = _model_upload(client, alice)
    created = client.post("/v1/jobs", json=quantize_job(upload, metadata={"team": "search"}), headers=alice.headers)
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["status"] == "queued"
    assert job["steps"] == [
        {
            "index": 0,
            "method": "quantize",
            "status": "pending",
            "started_at": None,
            "finished_at": None,
            "duration_s": None,
        }
    ]
    assert job["metadata"] == {"team": "search"}
    assert created.headers["location"] == f"/v1/jobs/{job['id']}"

    fetched = client.get(f"/v1/jobs/{job['id']}", headers=alice.headers).json()
    assert fetched["id"] == job["id"] and fetched["progress"] == {"fraction": 0.0, "message": ""}

    events = client.get(f"/v1/jobs/{job['id']}/events", headers=alice.headers).json()
    assert [e["type"] for e in events["data"]] == ["job.queued"]


def test_list_pagination_and_filters(client: TestClient, alice: Caller) -> None:
    upload = _model_upload(client, alice)
    ids = []
    for i in range(5):
        body = quantize_job(upload, metadata={"run": str(i % 2)})
        ids.append(client.post("/v1/jobs", json=body, headers=alice.headers).json()["id"])
    page1 = client.get("/v1/jobs?limit=2", headers=alice.headers).json()
    assert [j["id"] for j in page1["data"]] == ids[::-1][:2] and page1["has_more"] is True
    page2 = client.get(f"/v1/jobs?limit=2&after={page1['data'][-1]['id']}", headers=alice.headers).json()
    assert [j["id"] for j in page2["data"]] == ids[::-1][2:4]
    page3 = client.get(f"/v1/jobs?limit=2&after={page2['data'][-1]['id']}", headers=alice.headers).json()
    assert [j["id"] for j in page3["data"]] == ids[:1] and page3["has_more"] is False

    odd = client.get("/v1/jobs?metadata[run]=1", headers=alice.headers).json()
    assert {j["id"] for j in odd["data"]} == {ids[1], ids[3]}
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=alice.headers)
    cancelled = client.get("/v1/jobs?status=cancelled", headers=alice.headers).json()
    assert [j["id"] for j in cancelled["data"]] == [ids[0]]
    assert client.get("/v1/jobs?status=bogus", headers=alice.headers).status_code == 422


def test_validation_errors_are_problem_json(client: TestClient, alice: Caller) -> None:
    upload = _model_upload(client, alice)
    config = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2}
    shaped = upload_files(
        client, alice.headers, {"config.json": json.dumps(config).encode(), "model.safetensors": b"0"}
    )
    cases = [
        ({"model": {"upload_id": upload}, "steps": [{"method": "explode"}]}, "steps.0"),
        ({"model": {"upload_id": upload}, "steps": [{"method": "quantize", "scheme": "w3a16"}]}, "scheme"),
        (
            {"model": {"upload_id": upload}, "steps": [{"method": "quantize", "scheme": "w4a16", "group_size": 48}]},
            "group_size",
        ),
        ({"model": {"upload_id": upload}, "steps": []}, "steps"),
        (  # the uploaded config.json says hidden_size 64: refused before any work, naming a size that fits
            {"model": {"upload_id": shaped}, "steps": [{"method": "quantize", "scheme": "w4a16", "group_size": 128}]},
            "steps.0.group_size: group_size 128 does not divide the input width 64: use group_size 64",
        ),
        (
            {"model": {"upload_id": upload}, "steps": [{"method": "quantize", "scheme": "w8a16", "ignore": ["re:("]}]},
            "steps.0.quantize.ignore",
        ),
        ({"model": {"upload_id": upload}, "steps": [{"method": "quantize", "scheme": "w8a16", "bogus": 1}]}, "bogus"),
        (
            {"model": {"upload_id": upload}, "steps": [{"method": "prune", "algorithm": "wanda", "sparsity": 0.5}]},
            "calibration",
        ),
        ({"model": {"upload_id": "upl_missing"}, "steps": [{"method": "quantize", "scheme": "w8a16"}]}, "model"),
        (
            {"model": {"uri": "s3://not-allowed/x/"}, "steps": [{"method": "quantize", "scheme": "w8a16"}]},
            "not on the operator's allow-list",
        ),
    ]
    for body, needle in cases:
        response = client.post("/v1/jobs", json=body, headers=alice.headers)
        assert response.status_code == 422, (body, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["status"] == 422 and problem["title"] and problem["type"].startswith("https://")
        assert needle in json.dumps(problem), (needle, problem)


def test_auth_required_and_tenant_isolation(client: TestClient, alice: Caller, bob: Caller) -> None:
    upload = _model_upload(client, alice)
    job = client.post("/v1/jobs", json=quantize_job(upload), headers=alice.headers).json()
    assert client.get("/v1/jobs").status_code == 401
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
    for path in (
        f"/v1/jobs/{job['id']}",
        f"/v1/jobs/{job['id']}/events",
        f"/v1/jobs/{job['id']}/artifacts",
        f"/v1/uploads/{upload}",
    ):
        response = client.get(path, headers=bob.headers)
        assert response.status_code == 404, path
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=bob.headers).status_code == 404
    assert client.get("/v1/jobs", headers=bob.headers).json()["data"] == []
    # bob cannot use alice's upload either
    assert client.post("/v1/jobs", json=quantize_job(upload), headers=bob.headers).status_code == 422


def test_idempotency_key(client: TestClient, alice: Caller) -> None:
    from sqlalchemy import insert

    from app.db import session_scope
    from app.jobs.models import IdempotencyKey

    upload = _model_upload(client, alice)
    headers = {**alice.headers, "Idempotency-Key": "abc-1"}
    first = client.post("/v1/jobs", json=quantize_job(upload), headers=headers)
    again = client.post("/v1/jobs", json=quantize_job(upload), headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other = client.post("/v1/jobs", json=quantize_job(upload, metadata={"x": "y"}), headers=headers)
    assert other.status_code == 422 and "different request body" in other.json()["detail"]
    # A twin still being created (key reserved, no job yet) answers 409.
    body = quantize_job(upload)
    from app.jobs.service import _request_hash
    from app.jobs.spec import JobSpec

    with session_scope() as session:
        session.execute(
            insert(IdempotencyKey).values(
                tenant_id=alice.tenant_id,
                key="in-flight",
                request_hash=_request_hash(JobSpec.model_validate(body).canonical()),
            )
        )
    busy = client.post("/v1/jobs", json=body, headers={**alice.headers, "Idempotency-Key": "in-flight"})
    assert busy.status_code == 409
    # A reservation whose request died before it made the job (older than a minute) is taken over.
    from datetime import timedelta

    from sqlalchemy import update

    from app.db import utcnow

    with session_scope() as session:
        session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.key == "in-flight")
            .values(created_at=utcnow() - timedelta(minutes=2))
        )
    taken = client.post("/v1/jobs", json=body, headers={**alice.headers, "Idempotency-Key": "in-flight"})
    assert taken.status_code == 201, taken.text
    replay = client.post("/v1/jobs", json=body, headers={**alice.headers, "Idempotency-Key": "in-flight"})
    assert replay.status_code == 200 and replay.json()["id"] == taken.json()["id"]
    # A failed creation releases its key so the client can retry.
    bad = client.post("/v1/jobs", json=quantize_job("upl_nope"), headers={**alice.headers, "Idempotency-Key": "k2"})
    assert bad.status_code == 422
    retry = client.post("/v1/jobs", json=quantize_job(upload), headers={**alice.headers, "Idempotency-Key": "k2"})
    assert retry.status_code == 201


def test_a_stalled_request_whose_key_was_taken_over_makes_no_second_job(
    client: TestClient, alice: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that stalls past the reservation window loses its Idempotency-Key to a retry: the retry
    makes the job, the stalled request answers 409 and leaves nothing behind."""
    import threading
    from datetime import timedelta

    from app.auth import quotas
    from app.jobs import service

    upload = _model_upload(client, alice)
    real, real_utcnow = quotas.check_queued_quota, service.utcnow
    stalled, release = threading.Event(), threading.Event()

    def stall_first_time(*args: Any, **kwargs: Any) -> Any:
        if not stalled.is_set():
            stalled.set()
            # e.g. waiting on the tenant row lock or a slow DNS answer for webhook_url; held until the retry is done
            assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(quotas, "check_queued_quota", stall_first_time)
    headers = {**alice.headers, "Idempotency-Key": "slow-1"}
    answers: dict[str, Any] = {}
    first = threading.Thread(
        target=lambda: answers.update(first=client.post("/v1/jobs", json=quantize_job(upload), headers=headers))
    )
    first.start()
    assert stalled.wait(10)
    # The retry arrives after the reservation window: the service's clock is moved past it (no sleeping).
    later = real_utcnow() + timedelta(seconds=service.IDEMPOTENCY_RESERVATION_S + 1)
    monkeypatch.setattr(service, "utcnow", lambda: later)
    retry = client.post("/v1/jobs", json=quantize_job(upload), headers=headers)
    monkeypatch.setattr(service, "utcnow", real_utcnow)
    release.set()
    first.join()
    assert retry.status_code == 201, retry.text
    assert answers["first"].status_code == 409
    assert answers["first"].headers["content-type"] == "application/problem+json"
    jobs = client.get("/v1/jobs", headers=alice.headers).json()["data"]
    assert [job["id"] for job in jobs] == [retry.json()["id"]]
    replay = client.post("/v1/jobs", json=quantize_job(upload), headers=headers)
    assert replay.status_code == 200 and replay.json()["id"] == retry.json()["id"]


def test_cancel_rules(client: TestClient, alice: Caller) -> None:
    from app.db import session_scope
    from app.jobs import lifecycle

    upload = _model_upload(client, alice)
    queued = client.post("/v1/jobs", json=quantize_job(upload), headers=alice.headers).json()
    assert client.post(f"/v1/jobs/{queued['id']}/cancel", headers=alice.headers).json()["status"] == "cancelled"
    again = client.post(f"/v1/jobs/{queued['id']}/cancel", headers=alice.headers)
    assert again.status_code == 409 and again.headers["content-type"] == "application/problem+json"

    running = client.post("/v1/jobs", json=quantize_job(upload), headers=alice.headers).json()
    with session_scope() as session:
        assert lifecycle.claim(session, running["id"], "w1", 60)
    assert client.post(f"/v1/jobs/{running['id']}/cancel", headers=alice.headers).json()["status"] == "cancelling"
    with session_scope() as session:
        # the worker notices at its next heartbeat and stops
        assert lifecycle.heartbeat(session, running["id"], "w1", 60) == "cancelling"
        assert lifecycle.mark_cancelled(session, running["id"], "w1")
        # terminal states never change
        assert not lifecycle.claim(session, running["id"], "w2", 60)
        assert not lifecycle.fail(session, running["id"], "x", "y")
    types = [e["type"] for e in client.get(f"/v1/jobs/{running['id']}/events", headers=alice.headers).json()["data"]]
    assert types == ["job.queued", "job.started", "job.cancelling", "job.cancelled"]


def test_non_finite_engine_numbers_are_stored_as_null(client: TestClient, alice: Caller) -> None:
    """Postgres refuses NaN/inf in JSON columns: a diverged training loss must reach the API as null,
    not fail the job with a database error."""
    from app.db import session_scope
    from app.jobs import lifecycle

    job = client.post("/v1/jobs", json=quantize_job(_model_upload(client, alice)), headers=alice.headers).json()
    with session_scope() as session:
        assert lifecycle.claim(session, job["id"], "w1", 60)
        data = {"train_loss": float("nan"), "curve": [1.5, float("inf")], "nested": {"kl": float("-inf")}}
        assert lifecycle.set_progress(session, job["id"], "w1", 0.5, "training", data)
        steps = [{"index": 0, "method": "distill", "status": "succeeded", "duration_s": float("nan")}]
        assert lifecycle.set_steps(session, job["id"], "w1", steps)
        assert lifecycle.succeed(session, job["id"], "w1", "m.json", {"perplexity": float("inf")}, {})
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=alice.headers).json()["data"]
    progress = next(e["data"] for e in events if e["type"] == "job.progress")
    assert progress["train_loss"] is None and progress["curve"] == [1.5, None] and progress["nested"] == {"kl": None}
    done = client.get(f"/v1/jobs/{job['id']}", headers=alice.headers).json()
    assert done["status"] == "succeeded" and done["summary"] == {"perplexity": None}
    assert done["steps"][0]["status"] == "succeeded" and done["steps"][0]["duration_s"] is None


def test_sse_stream_resumes_from_last_event_id(client: TestClient, alice: Caller) -> None:
    from app.db import session_scope
    from app.jobs import lifecycle

    upload = _model_upload(client, alice)
    job = client.post("/v1/jobs", json=quantize_job(upload), headers=alice.headers).json()
    with session_scope() as session:
        lifecycle.claim(session, job["id"], "w1", 60)
        lifecycle.set_progress(session, job["id"], "w1", 0.5, "half way")
        lifecycle.fail(session, job["id"], "internal_error", "boom", "w1")

    def read(headers: dict[str, str]) -> list[tuple[int, str]]:
        frames = []
        with client.stream("GET", f"/v1/jobs/{job['id']}/events/stream", headers=headers) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            event_id = None
            for line in response.iter_lines():
                if line.startswith("id: "):
                    event_id = int(line[4:])
                elif line.startswith("event: "):
                    frames.append((event_id, line[7:]))
        return frames

    frames = read(alice.headers)
    assert [t for _, t in frames] == ["job.queued", "job.started", "job.progress", "job.failed"]
    ids = [i for i, _ in frames]
    assert ids == sorted(ids)
    resumed = read({**alice.headers, "Last-Event-ID": str(ids[1])})
    assert [t for _, t in resumed] == ["job.progress", "job.failed"]


def test_reaper_requeues_then_fails_lost_jobs(client: TestClient, alice: Caller) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from app.config import get_settings
    from app.db import session_scope, utcnow
    from app.jobs import lifecycle
    from app.jobs.models import Job

    upload = _model_upload(client, alice)
    job = client.post("/v1/jobs", json=quantize_job(upload), headers=alice.headers).json()
    max_attempts = get_settings().max_attempts
    for attempt in range(1, max_attempts + 1):
        with session_scope() as session:
            assert lifecycle.claim(session, job["id"], f"w{attempt}", 60)
            session.execute(
                update(Job).where(Job.id == job["id"]).values(lease_expires_at=utcnow() - timedelta(seconds=1))
            )
        reap_with_sight()
        state = client.get(f"/v1/jobs/{job['id']}", headers=alice.headers).json()
        if attempt < max_attempts:
            assert state["status"] == "queued" and state["attempts"] == attempt
        else:
            assert state["status"] == "failed"
            assert state["error"]["type"] == "worker_lost" and "lease expired" in state["error"]["message"]
    types = [e["type"] for e in client.get(f"/v1/jobs/{job['id']}/events", headers=alice.headers).json()["data"]]
    assert types.count("job.retrying") == max_attempts - 1 and types[-1] == "job.failed"


def test_openapi_documents_the_api(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/events/stream",
        "/v1/jobs/{job_id}/artifacts",
        "/v1/uploads",
        "/v1/uploads/{upload_id}/complete",
    ):
        assert path in schema["paths"], path
    assert client.get("/docs").status_code == 200
