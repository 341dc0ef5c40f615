"""Webhooks against Postgres and a real HTTP receiver on loopback (allow-listed for these tests).

The relay is driven by calling it; "time passes" by making pending deliveries due (no sleeping).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from tests.helpers import Caller, Receiver, free_port, quantize_job, upload_files, verify

ARTIFACTS = [{"path": "model/model.safetensors", "size": 64, "sha256": "ab" * 32}]


# A receiver -----------------------------------------------------------------------------------------


@pytest.fixture
def receiver(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """A receiver on loopback, with loopback allow-listed and plain http allowed for this test."""
    from app.config import get_settings

    monkeypatch.setenv("MODELPRESS_ALLOW_HTTP_URLS", "true")
    monkeypatch.setenv("MODELPRESS_URL_ALLOWLIST", '["127.0.0.1"]')
    get_settings.cache_clear()
    server = Receiver(port=free_port())
    server.start()
    yield server
    server.stop()
    get_settings.cache_clear()


# Helpers --------------------------------------------------------------------------------------------


def relay_once() -> Any:
    from app.webhooks.relay import Relay

    with Relay() as relay:
        return relay.run_once()


def make_due() -> None:
    """Move the clock past every pending retry (instead of waiting for the backoff)."""
    from app.db import session_scope, utcnow
    from app.webhooks.models import WebhookDelivery

    with session_scope() as session:
        session.execute(
            update(WebhookDelivery).where(WebhookDelivery.status == "pending").values(next_attempt_at=utcnow())
        )


def create_endpoint(client: TestClient, caller: Caller, url: str, **extra: Any) -> dict[str, Any]:
    response = client.post("/v1/webhooks", json={"url": url, **extra}, headers=caller.headers)
    assert response.status_code == 201, response.text
    return dict(response.json())


def new_upload(client: TestClient, caller: Caller) -> str:
    return upload_files(client, caller.headers, {"config.json": b"{}", "model.safetensors": b"\x00" * 64})


def submit(client: TestClient, caller: Caller, upload: str, **extra: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=quantize_job(upload, **extra), headers=caller.headers)
    assert response.status_code == 201, response.text
    return dict(response.json())


def run_job(job_id: str, outcome: str = "succeed", progress: tuple[float, ...] = ()) -> None:
    """Drive a job with the lifecycle functions, one transaction per step, like a worker."""
    from app.db import session_scope
    from app.jobs import lifecycle

    with session_scope() as session:
        assert lifecycle.claim(session, job_id, "w1", 60)
    for fraction in progress:
        with session_scope() as session:
            lifecycle.set_progress(session, job_id, "w1", fraction, f"at {fraction}")
    with session_scope() as session:
        if outcome == "succeed":
            assert lifecycle.succeed(
                session,
                job_id,
                "w1",
                f"artifacts/x/{job_id}/manifest.json",
                {"size_ratio": 0.5},
                {"artifacts": ARTIFACTS},
            )
        else:
            assert lifecycle.fail(session, job_id, "model_error", "bad tensor at https://s3/x?X-Amz-Signature=s", "w1")


def deliveries(client: TestClient, caller: Caller, endpoint_id: str, **params: Any) -> list[dict[str, Any]]:
    response = client.get(
        f"/v1/webhooks/{endpoint_id}/deliveries", params={"limit": 100, **params}, headers=caller.headers
    )
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


# Endpoints API --------------------------------------------------------------------------------------


def test_endpoint_crud_secret_once_and_tenant_isolation(
    client: TestClient, receiver: Receiver, alice: Caller, bob: Caller
) -> None:
    created = create_endpoint(client, alice, receiver.url, events=["job.succeeded", "job.failed"], description="ci")
    assert created["secret"].startswith("whsec_") and created["events"] == ["job.succeeded", "job.failed"]
    endpoint_id = created["id"]
    fetched = client.get(f"/v1/webhooks/{endpoint_id}", headers=alice.headers).json()
    assert "secret" not in fetched and fetched["enabled"] is True
    assert [e["id"] for e in client.get("/v1/webhooks", headers=alice.headers).json()["data"]] == [endpoint_id]

    patched = client.patch(
        f"/v1/webhooks/{endpoint_id}", json={"events": None, "description": "all"}, headers=alice.headers
    )
    assert patched.status_code == 200 and patched.json()["events"] is None and patched.json()["description"] == "all"
    bad = client.patch(f"/v1/webhooks/{endpoint_id}", json={"events": ["job.exploded"]}, headers=alice.headers)
    assert bad.status_code == 422
    null_url = client.patch(f"/v1/webhooks/{endpoint_id}", json={"url": None}, headers=alice.headers)
    assert null_url.status_code == 422 and "must not be null" in null_url.text

    # Another tenant sees nothing and can change nothing.
    assert client.get("/v1/webhooks", headers=bob.headers).json()["data"] == []
    for method, path in [
        ("GET", f"/v1/webhooks/{endpoint_id}"),
        ("PATCH", f"/v1/webhooks/{endpoint_id}"),
        ("DELETE", f"/v1/webhooks/{endpoint_id}"),
        ("POST", f"/v1/webhooks/{endpoint_id}/rotate-secret"),
        ("GET", f"/v1/webhooks/{endpoint_id}/deliveries"),
        ("POST", f"/v1/webhooks/{endpoint_id}/deliveries/msg_x/redeliver"),
    ]:
        answer = client.request(method, path, json={} if method == "PATCH" else None, headers=bob.headers)
        assert answer.status_code == 404, (method, path, answer.text)
        assert answer.headers["content-type"].startswith("application/problem+json")

    assert client.delete(f"/v1/webhooks/{endpoint_id}", headers=alice.headers).status_code == 204
    assert client.get(f"/v1/webhooks/{endpoint_id}", headers=alice.headers).status_code == 404


def test_unsafe_urls_are_refused_with_a_clear_422(client: TestClient, alice: Caller) -> None:
    cases = {
        "https://127.0.0.1/hook": "loopback",
        "https://10.20.30.40/hook": "private",
        "https://169.254.169.254/latest/meta-data/": "link-local",
        "https://[::ffff:127.0.0.1]/hook": "IPv6 form of 127.0.0.1",
        "https://localhost/hook": "loopback",
        "http://127.0.0.1:9/hook": "https",
    }
    for url, reason in cases.items():
        response = client.post("/v1/webhooks", json={"url": url}, headers=alice.headers)
        assert response.status_code == 422, (url, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        body = response.json()
        assert reason in body["detail"] and body["errors"][0]["field"] == "url", body
    # The one-off URL of a job is checked the same way, before the job exists.
    upload = new_upload(client, alice)
    job = client.post(
        "/v1/jobs", json=quantize_job(upload, webhook_url="https://169.254.169.254/"), headers=alice.headers
    )
    assert job.status_code == 422 and "webhook_url" in job.json()["detail"] and "link-local" in job.json()["detail"]
    assert client.get("/v1/jobs", headers=alice.headers).json()["data"] == []


# Delivery -------------------------------------------------------------------------------------------


def test_every_event_arrives_signed_in_order_with_thin_payloads(
    client: TestClient, receiver: Receiver, alice: Caller, bob: Caller
) -> None:
    endpoint = create_endpoint(client, alice, receiver.url)
    create_endpoint(client, bob, receiver.url)  # bob's endpoint must not see alice's jobs
    upload = new_upload(client, alice)
    ok = submit(client, alice, upload)["id"]
    run_job(ok, progress=(0.2, 0.4))  # the second progress falls inside 5 s: throttled
    bad = submit(client, alice, upload)["id"]
    run_job(bad, outcome="fail")
    gone = submit(client, alice, upload)["id"]
    assert client.post(f"/v1/jobs/{gone}/cancel", headers=alice.headers).status_code == 200

    stats = relay_once()
    assert stats.delivered == 9 and stats.failed == stats.retrying == 0
    payloads = [verify(r, endpoint["secret"]) for r in receiver.requests]
    assert [(p["data"]["job_id"], p["type"]) for p in payloads] == [
        (ok, "job.queued"),
        (ok, "job.started"),
        (ok, "job.progress"),
        (ok, "job.succeeded"),
        (bad, "job.queued"),
        (bad, "job.started"),
        (bad, "job.failed"),
        (gone, "job.queued"),
        (gone, "job.cancelled"),
    ]
    for request in receiver.requests:
        assert request.headers["webhook-id"].startswith("msg_")
        assert request.headers["host"] == f"127.0.0.1:{receiver.port}"
    succeeded = payloads[3]["data"]
    assert succeeded["status"] == "succeeded" and succeeded["summary"] == {"size_ratio": 0.5}
    assert succeeded["artifacts"] == ARTIFACTS
    failed = payloads[6]["data"]
    assert failed["error"]["type"] == "model_error" and "X-Amz-Signature" not in failed["error"]["message"]
    raw = b"".join(r.body for r in receiver.requests)
    assert b"whsec_" not in raw and b"X-Amz" not in raw and b'"url"' not in raw and b"spec" not in raw
    # Bob's endpoint got nothing (1 delivery per event, alice's endpoint only).
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 9


def test_500_three_times_then_200_is_delivered_once_with_the_same_id(
    client: TestClient, receiver: Receiver, alice: Caller
) -> None:
    from app.db import utcnow

    endpoint = create_endpoint(client, alice, receiver.url, events=["job.queued"])
    receiver.plan = [(500, {}), (500, {}), (503, {"Retry-After": "120"})]
    submit(client, alice, new_upload(client, alice))

    before = utcnow()
    assert relay_once().retrying == 1
    [pending] = deliveries(client, alice, endpoint["id"])
    assert pending["status"] == "pending" and pending["attempts"][0]["status_code"] == 500
    wait = (_parse(pending["next_attempt_at"]) - before).total_seconds()
    assert 23 <= wait <= 37, wait  # the first backoff step: 30 s ± 20 % jitter
    assert relay_once().claimed == 0  # not due yet

    make_due()
    relay_once()
    make_due()
    relay_once()
    [pending] = deliveries(client, alice, endpoint["id"])
    wait = (_parse(pending["next_attempt_at"]) - utcnow()).total_seconds()
    assert 110 <= wait <= 121, wait  # Retry-After honoured
    make_due()
    assert relay_once().delivered == 1
    make_due()
    assert relay_once().claimed == 0

    assert [r.answered for r in receiver.requests] == [500, 500, 503, 200]
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
    assert len(receiver.accepted()) == 1
    verify(receiver.accepted()[0], endpoint["secret"])
    [done] = deliveries(client, alice, endpoint["id"])
    assert done["status"] == "delivered" and done["attempt_count"] == 4 and done["next_attempt_at"] is None
    assert [a["status_code"] for a in done["attempts"]] == [500, 500, 503, 200]
    assert all(a["latency_ms"] >= 0 for a in done["attempts"])


def _parse(value: str) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(value)


def test_redirects_are_failures_and_not_followed(client: TestClient, receiver: Receiver, alice: Caller) -> None:
    endpoint = create_endpoint(client, alice, receiver.url, events=["job.queued"])
    receiver.plan = [(302, {"Location": "http://169.254.169.254/"})]
    submit(client, alice, new_upload(client, alice))
    assert relay_once().retrying == 1
    [pending] = deliveries(client, alice, endpoint["id"])
    assert pending["last_status_code"] == 302 and "not followed" in pending["last_error"]
    assert len(receiver.requests) == 1


def test_410_disables_the_endpoint(client: TestClient, receiver: Receiver, alice: Caller) -> None:
    endpoint = create_endpoint(client, alice, receiver.url)
    receiver.plan = [(410, {})]
    upload = new_upload(client, alice)
    job = submit(client, alice, upload)["id"]
    stats = relay_once()
    assert stats.disabled_endpoints == [endpoint["id"]]
    state = client.get(f"/v1/webhooks/{endpoint['id']}", headers=alice.headers).json()
    assert state["enabled"] is False and "410" in state["disabled_reason"]
    run_job(job)  # events of a disabled endpoint are not even queued
    make_due()
    assert relay_once().claimed == 0 and len(receiver.requests) == 1
    assert [d["status"] for d in deliveries(client, alice, endpoint["id"])] == ["failed"]
    # The tenant can switch it back on; new events flow again.
    assert client.patch(f"/v1/webhooks/{endpoint['id']}", json={"enabled": True}, headers=alice.headers).json()[
        "enabled"
    ]
    submit(client, alice, upload)
    assert relay_once().delivered == 1


def test_order_per_endpoint_holds_while_an_earlier_event_waits(
    client: TestClient, receiver: Receiver, alice: Caller
) -> None:
    slow = create_endpoint(client, alice, receiver.url + "?slow")
    fast_receiver = Receiver(port=free_port())
    fast_receiver.start()
    try:
        fast = create_endpoint(client, alice, fast_receiver.url)
        receiver.plan = [(500, {})]
        upload = new_upload(client, alice)
        jobs = [submit(client, alice, upload)["id"] for _ in range(3)]
        for job in jobs:
            run_job(job)
        relay_once()
        # The first event failed on ``slow``: nothing after it went out there; ``fast`` got everything.
        assert len(receiver.requests) == 1
        assert len(fast_receiver.requests) == 9
        make_due()
        relay_once()
        order = [(r.payload["data"]["job_id"], r.payload["type"]) for r in receiver.accepted()]
        assert order == [(r.payload["data"]["job_id"], r.payload["type"]) for r in fast_receiver.requests]
        # All three were queued first, then each ran: the order the events were recorded in.
        expected = [(j, "job.queued") for j in jobs] + [(j, t) for j in jobs for t in ("job.started", "job.succeeded")]
        assert order == expected
        verify(fast_receiver.requests[0], fast["secret"])
        verify(receiver.requests[-1], slow["secret"])
    finally:
        fast_receiver.stop()


def test_receiver_down_then_back_gets_all_events_after_a_relay_restart(
    client: TestClient, receiver: Receiver, alice: Caller
) -> None:
    from app.db import utcnow
    from app.webhooks.relay import Relay

    endpoint = create_endpoint(client, alice, receiver.url)
    receiver.stop()
    upload = new_upload(client, alice)
    jobs = [submit(client, alice, upload)["id"] for _ in range(20)]
    for job in jobs:
        run_job(job)

    first = Relay()
    stats = first.run_once()
    assert stats.retrying == 1 and stats.delivered == 0  # the head failed; the other 59 wait behind it
    make_due()
    crashed = first.claim(utcnow())  # a relay that claims and then dies before sending: the lease expires
    assert len(crashed) == 1
    first.close()

    receiver.start()
    with Relay() as second:  # a new relay, as after a process restart
        assert second.run_once().claimed == 0  # the crashed claim is leased, not lost
        stats = second.run_once(now=utcnow() + timedelta(minutes=5))
    assert stats.delivered == 60 and stats.failed == 0
    accepted = receiver.accepted()
    assert len(accepted) == 60
    got = [(verify(r, endpoint["secret"])["data"]["job_id"], r.payload["type"]) for r in accepted]
    assert got == [(j, "job.queued") for j in jobs] + [(j, t) for j in jobs for t in ("job.started", "job.succeeded")]
    assert all(d["status"] == "delivered" for d in deliveries(client, alice, endpoint["id"], limit=100))


def test_timeouts_are_bounded(
    client: TestClient, receiver: Receiver, alice: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.config import get_settings

    monkeypatch.setenv("MODELPRESS_WEBHOOK_TIMEOUT_S", "0.3")
    get_settings.cache_clear()
    endpoint = create_endpoint(client, alice, receiver.url, events=["job.queued"])
    receiver.delay_s = 1.0
    submit(client, alice, new_upload(client, alice))
    assert relay_once().retrying == 1
    [pending] = deliveries(client, alice, endpoint["id"])
    assert "timed out" in pending["last_error"] and pending["attempts"][0]["latency_ms"] < 900


@pytest.mark.parametrize("trickle", ["body", "headers"])
def test_a_trickling_receiver_cannot_hold_the_relay(
    client: TestClient, receiver: Receiver, alice: Caller, monkeypatch: pytest.MonkeyPatch, trickle: str
) -> None:
    """Every read beats the 0.5 s read timeout, but the attempt as a whole has a deadline: the round
    ends within it and the delivery is retried later, instead of the relay waiting ~20 s."""
    import time

    from app.config import get_settings

    monkeypatch.setenv("MODELPRESS_WEBHOOK_TIMEOUT_S", "0.5")
    get_settings.cache_clear()
    endpoint = create_endpoint(client, alice, receiver.url, events=["job.queued"])
    receiver.trickle = trickle
    submit(client, alice, new_upload(client, alice))
    started = time.monotonic()
    assert relay_once().retrying == 1
    assert time.monotonic() - started < 4
    [pending] = deliveries(client, alice, endpoint["id"])
    assert "timed out" in pending["last_error"]


def test_claims_not_started_by_the_deadline_go_back_unattempted(
    client: TestClient, receiver: Receiver, alice: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One sending thread, two trickling endpoints: the first attempt holds the thread past the round's
    deadline (a timed-out attempt); the other claim never started, so it counts no attempt and is due
    again at once, while the timed-out one waits for its backoff."""
    from app.config import get_settings
    from app.webhooks.relay import Relay

    monkeypatch.setenv("MODELPRESS_WEBHOOK_TIMEOUT_S", "0.5")
    get_settings.cache_clear()
    other = Receiver(port=free_port(), trickle="headers")
    other.start()
    try:
        endpoints = [create_endpoint(client, alice, r.url, events=["job.queued"]) for r in (receiver, other)]
        receiver.trickle = "headers"
        submit(client, alice, new_upload(client, alice))
        with Relay(concurrency=1) as relay:
            first = relay.run_round()
            assert first.claimed == 2 and first.retrying == 1
            states = [deliveries(client, alice, e["id"])[0] for e in endpoints]
            attempted = [d for d in states if d["attempts"]]
            untouched = [d for d in states if not d["attempts"]]
            assert len(attempted) == 1 and "timed out" in attempted[0]["last_error"]
            assert len(untouched) == 1 and untouched[0]["status"] == "pending"
            assert relay.run_round().claimed == 1  # only the released one is due
    finally:
        other.stop()


def test_one_off_job_webhook_url_with_its_own_secret(client: TestClient, receiver: Receiver, alice: Caller) -> None:
    upload = new_upload(client, alice)
    created = client.post(
        "/v1/jobs",
        json=quantize_job(upload, webhook_url=receiver.url),
        headers={**alice.headers, "Idempotency-Key": "k1"},
    )
    assert created.status_code == 201
    job = created.json()
    secret = job["webhook_secret"]
    assert secret.startswith("whsec_")
    replay = client.post(
        "/v1/jobs",
        json=quantize_job(upload, webhook_url=receiver.url),
        headers={**alice.headers, "Idempotency-Key": "k1"},
    )
    assert replay.status_code == 200 and replay.json()["webhook_secret"] == secret
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice.headers).json()["webhook_secret"] is None
    other = submit(client, alice, upload)["id"]  # a job without webhook_url: nothing for this URL
    run_job(job["id"])
    run_job(other)
    relay_once()
    assert [verify(r, secret)["type"] for r in receiver.requests] == ["job.queued", "job.started", "job.succeeded"]
    assert client.get("/v1/webhooks", headers=alice.headers).json()["data"] == []  # internal, not listed


def test_rotate_secret_signs_with_both_during_the_overlap(
    client: TestClient, receiver: Receiver, alice: Caller
) -> None:
    endpoint = create_endpoint(client, alice, receiver.url, events=["job.queued"])
    rotated = client.post(f"/v1/webhooks/{endpoint['id']}/rotate-secret", headers=alice.headers)
    assert rotated.status_code == 200 and rotated.json()["secret"] != endpoint["secret"]
    assert rotated.json()["previous_secret_expires_at"] is not None
    upload = new_upload(client, alice)
    submit(client, alice, upload)
    relay_once()
    request = receiver.requests[-1]
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    verify(request, endpoint["secret"])
    verify(request, rotated.json()["secret"])

    again = client.post(f"/v1/webhooks/{endpoint['id']}/rotate-secret", json={"overlap_s": 0}, headers=alice.headers)
    submit(client, alice, upload)
    relay_once()
    request = receiver.requests[-1]
    assert len(request.headers["webhook-signature"].split(" ")) == 1
    verify(request, again.json()["secret"])
    with pytest.raises(Exception, match="signature"):
        verify(request, rotated.json()["secret"])


def test_delivery_log_and_redeliver(client: TestClient, receiver: Receiver, alice: Caller, bob: Caller) -> None:
    endpoint = create_endpoint(client, alice, receiver.url, events=["job.queued"])
    upload = new_upload(client, alice)
    submit(client, alice, upload)
    receiver.plan = [(500, {})]
    relay_once()
    [pending] = deliveries(client, alice, endpoint["id"])
    busy = client.post(f"/v1/webhooks/{endpoint['id']}/deliveries/{pending['id']}/redeliver", headers=alice.headers)
    assert busy.status_code == 409
    make_due()
    relay_once()
    [done] = deliveries(client, alice, endpoint["id"], status="delivered")
    assert done["payload"]["type"] == "job.queued" and len(done["attempts"]) == 2

    path = f"/v1/webhooks/{endpoint['id']}/deliveries/{done['id']}/redeliver"
    assert client.post(path, headers=bob.headers).status_code == 404
    again = client.post(path, headers=alice.headers)
    assert again.status_code == 202 and again.json()["status"] == "pending"
    relay_once()
    assert [r.headers["webhook-id"] for r in receiver.requests] == [done["id"]] * 3
    [final] = deliveries(client, alice, endpoint["id"])
    assert final["status"] == "delivered" and len(final["attempts"]) == 3

    # Pagination: newest first with an ``after`` cursor.
    submit(client, alice, upload)
    relay_once()
    first = client.get(f"/v1/webhooks/{endpoint['id']}/deliveries?limit=1", headers=alice.headers).json()
    assert first["has_more"] is True
    rest = client.get(
        f"/v1/webhooks/{endpoint['id']}/deliveries?limit=1&after={first['data'][0]['id']}", headers=alice.headers
    ).json()
    assert rest["data"][0]["id"] == done["id"] and rest["has_more"] is False


def test_relay_on_sqlite(embedded_stack: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded mode (no SKIP LOCKED) claims with a plain select and delivers the same way."""
    from app.auth.service import create_tenant
    from app.config import get_settings
    from app.db import session_scope
    from app.jobs import lifecycle
    from app.jobs.models import Job
    from app.webhooks import service
    from app.webhooks.models import WebhookDelivery
    from app.webhooks.relay import Relay
    from app.webhooks.schemas import EndpointCreate

    monkeypatch.setenv("MODELPRESS_ALLOW_HTTP_URLS", "true")
    monkeypatch.setenv("MODELPRESS_URL_ALLOWLIST", '["127.0.0.1"]')
    get_settings.cache_clear()
    server = Receiver(port=free_port())
    server.start()
    try:
        with session_scope() as session:
            tenant = create_tenant(session, "solo")
            endpoint = service.create_endpoint(session, tenant.id, EndpointCreate(url=server.url), get_settings())
            job = Job(tenant_id=tenant.id, spec={}, steps=[])
            session.add(job)
            session.flush()
            lifecycle.record_event(session, job.id, tenant.id, "job.queued", {"status": "queued"})
            lifecycle.record_event(session, job.id, tenant.id, "job.step.started", {})  # not a webhook event
        # Through the Celery task the beat schedule runs (called in-process here).
        from workers.celery_app import celery_app
        from workers.tasks import deliver_webhooks

        assert celery_app.conf.beat_schedule["deliver-webhooks"]["task"] == deliver_webhooks.name
        assert deliver_webhooks()["delivered"] == 1
        with Relay() as relay:
            assert relay.run_once().claimed == 0
        assert verify(server.requests[0], endpoint.secret)["type"] == "job.queued"
        with session_scope() as session:
            assert session.execute(select(WebhookDelivery.status)).scalars().all() == ["delivered"]
    finally:
        server.stop()
        get_settings.cache_clear()


def _stored_secrets(endpoint_id: str) -> tuple[str, str | None]:
    from sqlalchemy import text

    from app.db import get_engine

    with get_engine().connect() as conn:
        row = conn.execute(
            text("SELECT secret, previous_secret FROM webhook_endpoints WHERE id = :id"), {"id": endpoint_id}
        ).one()
    return row[0], row[1]


def test_secrets_are_encrypted_at_rest_and_survive_a_key_rotation(
    client: TestClient, receiver: Receiver, alice: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography.fernet import Fernet

    from app.cli import main as cli
    from app.config import get_settings
    from app.crypto import SecretDecryptionError

    endpoint = create_endpoint(client, alice, receiver.url, events=["job.queued"])
    rotated = client.post(f"/v1/webhooks/{endpoint['id']}/rotate-secret", headers=alice.headers).json()
    stored, stored_previous = _stored_secrets(endpoint["id"])
    # The database holds Fernet tokens under the data directory's key, never the secrets.
    assert "whsec_" not in stored and stored_previous is not None and "whsec_" not in stored_previous
    old_key = get_settings().resolved_encryption_keys()[0]
    assert Fernet(old_key.encode()).decrypt(stored.encode()).decode() == rotated["secret"]
    assert Fernet(old_key.encode()).decrypt(stored_previous.encode()).decode() == endpoint["secret"]

    # Rotate the key: new first, old still listed; re-encrypt; then drop the old key.
    new_key = Fernet.generate_key().decode()
    monkeypatch.setenv("MODELPRESS_ENCRYPTION_KEYS", f"{new_key},{old_key}")
    get_settings.cache_clear()
    assert cli(["admin", "rotate-encryption-key"]) == 0
    monkeypatch.setenv("MODELPRESS_ENCRYPTION_KEYS", new_key)
    get_settings.cache_clear()
    restored, _ = _stored_secrets(endpoint["id"])
    assert Fernet(new_key.encode()).decrypt(restored.encode()).decode() == rotated["secret"]
    submit(client, alice, new_upload(client, alice))
    relay_once()
    verify(receiver.requests[-1], rotated["secret"])
    verify(receiver.requests[-1], endpoint["secret"])  # the overlap secret survived too

    # A key that never encrypted them: a clear error, not a garbage signature.
    monkeypatch.setenv("MODELPRESS_ENCRYPTION_KEYS", Fernet.generate_key().decode())
    get_settings.cache_clear()
    submit(client, alice, new_upload(client, alice))
    with pytest.raises(SecretDecryptionError, match="MODELPRESS_ENCRYPTION_KEYS"):
        relay_once()


def test_the_encryption_migration_round_trips_existing_secrets(
    client: TestClient, receiver: Receiver, alice: Caller
) -> None:
    """Downgrading decrypts the stored secrets back to the clear; upgrading encrypts them again."""
    from pathlib import Path

    from alembic import command
    from alembic.config import Config

    import app

    endpoint = create_endpoint(client, alice, receiver.url)
    config = Config(str(Path(app.__file__).resolve().parent.parent / "alembic.ini"))
    command.downgrade(config, "08c8e55424ba")
    try:
        assert _stored_secrets(endpoint["id"])[0] == endpoint["secret"]
    finally:
        command.upgrade(config, "head")
    stored, _ = _stored_secrets(endpoint["id"])
    assert stored != endpoint["secret"] and "whsec_" not in stored
    fetched = client.get(f"/v1/webhooks/{endpoint['id']}", headers=alice.headers)
    assert fetched.status_code == 200


def test_finished_deliveries_past_retention_are_pruned_pending_ones_kept(
    client: TestClient, receiver: Receiver, alice: Caller
) -> None:
    from app.db import session_scope, utcnow
    from app.webhooks.models import WebhookAttempt, WebhookDelivery
    from workers.tasks import prune_webhook_deliveries

    create_endpoint(client, alice, receiver.url, events=["job.queued"])
    upload = new_upload(client, alice)
    submit(client, alice, upload)
    submit(client, alice, upload)
    relay_once()
    receiver.plan = [(500, {})]
    submit(client, alice, upload)
    relay_once()
    with session_scope() as session:
        rows = list(session.execute(select(WebhookDelivery).order_by(WebhookDelivery.seq)).scalars())
        assert [row.status for row in rows] == ["delivered", "delivered", "pending"]
        ids = [row.id for row in rows]
        old = utcnow() - timedelta(days=31)  # the default retention is 30 days
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id.in_([ids[0], ids[2]])).values(created_at=old))

    assert prune_webhook_deliveries() == {"deleted": 1}
    with session_scope() as session:
        left = list(session.execute(select(WebhookDelivery.id).order_by(WebhookDelivery.seq)).scalars())
        assert left == ids[1:]  # the old pending one waits for its retry
        orphans = session.execute(select(WebhookAttempt).where(WebhookAttempt.delivery_id == ids[0])).all()
        assert orphans == []
