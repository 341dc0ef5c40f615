"""Quotas (running, queued, upload bytes), the per-key rate limit, /v1/limits and priorities."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.auth.ratelimit import Decision
from tests.helpers import REDIS_URL, Caller, quantize_job, sha256_bytes, upload_files

PROBLEM = "application/problem+json"


def set_quotas(tenant_id: str, **values: Any) -> None:
    from app.auth import service
    from app.db import session_scope

    with session_scope() as session:
        service.update_tenant(session, tenant_id, values)


def model_upload(client: TestClient, caller: Caller) -> str:
    return upload_files(client, caller.headers, {"config.json": b"{}", "model.safetensors": b"\x00" * 64})


def assert_429(response: Any) -> int:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == PROBLEM
    retry = int(response.headers["retry-after"])
    assert retry >= 1 and response.json()["retry_after_s"] == retry
    return retry


def test_a_freed_running_slot_lets_the_next_job_run(client: TestClient, alice: Caller, bob: Caller) -> None:
    from app.auth import quotas
    from app.config import get_settings
    from app.db import session_scope
    from app.jobs import lifecycle

    set_quotas(alice.tenant_id, max_running_jobs=1)
    upload = model_upload(client, alice)
    first, second, third = (
        client.post("/v1/jobs", json=quantize_job(upload), headers=alice.headers).json()["id"] for _ in range(3)
    )
    bobs = client.post("/v1/jobs", json=quantize_job(model_upload(client, bob)), headers=bob.headers).json()["id"]
    with session_scope() as session:
        assert lifecycle.claim(session, first, "w1", 60)
    with session_scope() as session:
        assert not lifecycle.claim(session, second, "w2", 60)  # alice's one slot is taken
        # the worker learns the job still waits, so it rings again later
        assert quotas.deferred_job(session, second, get_settings()) == ("cpu", 5)
        assert lifecycle.claim(session, bobs, "w2", 60)  # other tenants are not held back
    assert client.get(f"/v1/jobs/{second}", headers=alice.headers).json()["status"] == "queued"

    with session_scope() as session:
        assert lifecycle.succeed(session, first, "w1", "artifacts/x/manifest.json", {}, {})
    with session_scope() as session:
        assert lifecycle.claim(session, second, "w2", 60)  # the freed slot lets the next job run
        assert quotas.deferred_job(session, second, get_settings()) is None  # running: nothing to re-send
    with session_scope() as session:
        assert not lifecycle.claim(session, third, "w3", 60)
    # A cancelling job still holds its worker, so still holds the slot; cancelled frees it.
    assert client.post(f"/v1/jobs/{second}/cancel", headers=alice.headers).json()["status"] == "cancelling"
    with session_scope() as session:
        assert not lifecycle.claim(session, third, "w3", 60)
        assert lifecycle.mark_cancelled(session, second, "w2")
    with session_scope() as session:
        assert lifecycle.claim(session, third, "w3", 60)
    limits = client.get("/v1/limits", headers=alice.headers).json()
    assert limits["usage"]["running_jobs"] == 1 and limits["limits"]["max_running_jobs"] == 1


def test_queued_quota_answers_429_with_retry_after(client: TestClient, alice: Caller) -> None:
    set_quotas(alice.tenant_id, max_queued_jobs=2)
    upload = model_upload(client, alice)
    ids = [client.post("/v1/jobs", json=quantize_job(upload), headers=alice.headers).json()["id"] for _ in range(2)]
    full = client.post("/v1/jobs", json=quantize_job(upload), headers={**alice.headers, "Idempotency-Key": "k"})
    assert assert_429(full) == 15
    assert "limit of this tenant is 2" in full.json()["detail"]
    # Cancelling a queued job frees a place; the refused Idempotency-Key was released, so the retry works.
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=alice.headers)
    retry = client.post("/v1/jobs", json=quantize_job(upload), headers={**alice.headers, "Idempotency-Key": "k"})
    assert retry.status_code == 201, retry.text
    # Running jobs do not count as queued.
    from app.db import session_scope
    from app.jobs import lifecycle

    with session_scope() as session:
        assert lifecycle.claim(session, ids[1], "w1", 60)
    assert client.post("/v1/jobs", json=quantize_job(upload), headers=alice.headers).status_code == 201


def test_upload_bytes_quota_per_rolling_day(client: TestClient, alice: Caller) -> None:
    set_quotas(alice.tenant_id, max_upload_bytes=100)

    def declare(size: int) -> Any:
        body = {"files": [{"path": "model.safetensors", "size": size, "sha256": sha256_bytes(b"x")}]}
        return client.post("/v1/uploads", json=body, headers=alice.headers)

    assert declare(60).status_code == 201
    over = declare(60)
    retry = assert_429(over)
    assert 86_000 < retry <= 86_400  # the first upload leaves the 24-hour window in about a day
    assert declare(40).status_code == 201
    assert declare(101).status_code == 413  # can never fit: not a matter of waiting
    usage = client.get("/v1/limits", headers=alice.headers).json()["usage"]
    assert usage["upload_bytes_last_24h"] == 100


def test_request_rate_limit_per_key_in_redis(client: TestClient, alice: Caller) -> None:
    import redis

    from app.auth.service import create_key
    from app.db import session_scope

    set_quotas(alice.tenant_id, rate_limit_per_minute=3)
    for _ in range(3):
        assert client.get("/v1/jobs", headers=alice.headers).status_code == 200
    limited = client.get("/v1/jobs", headers=alice.headers)
    retry = assert_429(limited)
    assert 15 <= retry <= 20  # one request's worth of budget comes back every 20 s
    assert "3 requests per minute" in limited.json()["detail"]
    # Per key: the tenant's other key has its own budget.
    with session_scope() as session:
        _, other = create_key(session, alice.tenant_id, "second")
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {other}"}).status_code == 200
    assert redis.Redis.from_url(REDIS_URL).keys("modelpress:ratelimit:*")


def test_memory_rate_limiter_gcra() -> None:
    from app.auth.ratelimit import MemoryRateLimiter

    now = [0.0]
    limiter = MemoryRateLimiter(clock=lambda: now[0])

    def hit(key: str) -> Decision:
        return asyncio.run(limiter.hit(key, 6))

    assert [hit("k").allowed for _ in range(7)] == [True] * 6 + [False]  # a full burst, then stop
    assert hit("k").retry_after_s == 10  # one request per 10 s comes back
    now[0] = 10_000.0
    decision = hit("k")
    assert decision.allowed and decision.remaining == 0
    assert not hit("k").allowed
    assert hit("other").allowed  # keys are independent
    now[0] = 120_000.0  # idle for long: the budget is full again, not more
    assert [hit("k").allowed for _ in range(7)] == [True] * 6 + [False]


def test_embedded_mode_uses_the_in_process_limiter(embedded_stack: dict[str, str]) -> None:
    from app.auth.ratelimit import MemoryRateLimiter, check_rate, create_rate_limiter
    from app.config import get_settings

    settings = get_settings()
    limiter = create_rate_limiter(settings)
    assert isinstance(limiter, MemoryRateLimiter)

    async def three() -> list[bool]:
        return [(await check_rate(limiter, settings, "key_embedded", 2)).allowed for _ in range(3)]

    assert asyncio.run(three()) == [True, True, False]


def test_limits_shows_defaults_overrides_and_usage(client: TestClient, alice: Caller) -> None:
    set_quotas(alice.tenant_id, max_queued_jobs=9, priority=7)
    upload = model_upload(client, alice)
    client.post("/v1/jobs", json=quantize_job(upload), headers=alice.headers)
    body = client.get("/v1/limits", headers=alice.headers).json()
    assert body["tenant_id"] == alice.tenant_id
    assert body["limits"] == {
        "max_running_jobs": 2,
        "max_queued_jobs": 9,
        "max_upload_bytes_per_day": 1024**4,
        "requests_per_minute": 600,
        "priority": 7,
    }
    assert body["usage"] == {"running_jobs": 0, "queued_jobs": 1, "upload_bytes_last_24h": 66}


def test_jobs_are_enqueued_with_the_tenant_priority(
    client: TestClient, alice: Caller, bob: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    from app.broker import broker_priority, enqueue_job, get_celery

    assert [broker_priority(p) for p in (9, 5, 0, None, 42)] == [0, 4, 9, 4, 0]
    assert get_celery().conf.broker_transport_options["priority_steps"] == list(range(10))

    # Through the real Redis transport: a high-priority doorbell lands in the list workers pop first.
    assert enqueue_job("job_hi", "prio-test", priority=9) and enqueue_job("job_lo", "prio-test", priority=0)
    r = redis.Redis.from_url(REDIS_URL)
    sep = "\x06\x16"
    assert r.llen("prio-test") == 1 and r.llen(f"prio-test{sep}9") == 1
    assert b"job_hi" in bytes(r.lindex("prio-test", 0)) and b"job_lo" in bytes(r.lindex(f"prio-test{sep}9", 0))  # type: ignore[arg-type]

    sent: list[tuple[str, int | None]] = []
    monkeypatch.setattr(
        "app.jobs.service.enqueue_job", lambda job_id, queue, priority=None: sent.append((queue, priority))
    )
    set_quotas(alice.tenant_id, priority=9)
    client.post("/v1/jobs", json=quantize_job(model_upload(client, alice)), headers=alice.headers)
    client.post("/v1/jobs", json=quantize_job(model_upload(client, bob)), headers=bob.headers)
    assert sent == [("cpu", 9), ("cpu", 5)]


def test_runner_rings_a_held_back_job_again_later(
    client: TestClient, alice: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")  # the runner is the worker side
    from app.db import session_scope
    from app.jobs import lifecycle
    from workers import runner as runner_module

    set_quotas(alice.tenant_id, max_running_jobs=1, priority=8)
    upload = model_upload(client, alice)
    first, second = (
        client.post("/v1/jobs", json=quantize_job(upload), headers=alice.headers).json()["id"] for _ in range(2)
    )
    with session_scope() as session:
        assert lifecycle.claim(session, first, "w1", 60)
    rung: list[tuple[str, str, int | None, float | None]] = []
    monkeypatch.setattr(
        runner_module,
        "enqueue_job",
        lambda job_id, queue, priority=None, countdown=None: rung.append((job_id, queue, priority, countdown)),
    )
    from datetime import timedelta

    from sqlalchemy import update

    from app.db import utcnow
    from app.jobs.models import Job
    from workers.reaper import reap_once

    with session_scope() as session:  # queued for an hour: the reaper would take its doorbell for lost
        session.execute(update(Job).where(Job.id == second).values(updated_at=utcnow() - timedelta(hours=1)))
    runner_module.JobRunner(second).run()  # refused: returns at once, the job stays queued
    assert rung == [(second, "cpu", 8, 15)]
    # The refused claim's own re-ring is the job's one doorbell loop: the reaper does not start another.
    monkeypatch.setattr("workers.reaper.enqueue_job", lambda job_id, queue: rung.append((job_id, queue, None, None)))
    assert reap_once()["resent"] == 0 and len(rung) == 1
    runner_module.JobRunner(first).run()  # running elsewhere: not claimable, not rung again
    assert len(rung) == 1
    assert client.get(f"/v1/jobs/{second}", headers=alice.headers).json()["status"] == "queued"
