"""Outages of Postgres, Redis and the S3 server under a queue of jobs destroy no work (issue 16).

Each scenario cuts one dependency for ``MODELPRESS_FAULT_OUTAGE_S`` while ``MODELPRESS_FAULT_JOBS`` short
jobs queue behind one worker, restores it, and then checks the invariants:

- every job ends ``succeeded``: none is failed by the outage;
- no job ran twice at once: an attempt starts only after the previous one ended (job events);
- no job was re-queued for a lost worker (none died: a lease that ran out in the outage is the outage's);
- the queue moves again within 30 s of the recovery;
- during the database outage the API answers 503 + ``Retry-After`` (problem+json), not 500;
- afterwards the bucket holds only uploads and each job's published attempt, the worker's scratch space
  nothing at all;
- every webhook event is delivered at least once, and in order per endpoint.

Waits are on signals (job states, delivery rows) with deadlines; the only timed wait is the outage itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from sqlalchemy import select

from tests.fault.stack import FAULT_JOBS, OUTAGE_S, FaultStack
from tests.helpers import BUCKET, Receiver, free_port, job_events, upload_files, verify, wait_until
from tests.tiny import sample_text, write_model_dir

pytestmark = [pytest.mark.fault, pytest.mark.e2e, pytest.mark.timeout(900)]

HOOK_EVENTS = ["job.queued", "job.started", "job.succeeded", "job.failed", "job.cancelled"]
RESUME_WITHIN_S = 30.0
TERMINAL = {"succeeded", "failed", "cancelled"}
# Events that end an attempt: re-queued (a lost worker, or an attempt released in an outage) or finished.
ATTEMPT_ENDS = {"job.retrying", "job.succeeded", "job.failed", "job.cancelled"}


def _until(what: str, check: Callable[[], Any], timeout: float, every: float = 0.3) -> Any:
    """Poll ``check`` until it returns something truthy; an API behind the outage answers "not yet"."""
    return wait_until(check, timeout, what, interval=every, ignoring=(httpx.HTTPError,))


def _statuses(client: httpx.Client, job_ids: list[str]) -> dict[str, str]:
    statuses = {}
    for job_id in job_ids:
        response = client.get(f"/v1/jobs/{job_id}")
        if response.status_code != 200:
            return {}
        statuses[job_id] = response.json()["status"]
    return statuses


def _submit(client: httpx.Client, spec: dict[str, Any]) -> str:
    created = client.post("/v1/jobs", json=spec)
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver on loopback (not behind any proxy: the outages are the service's, not its)."""
    hooks = Receiver(port=free_port())
    hooks.start()
    yield hooks
    hooks.stop()


@pytest.mark.parametrize("dependency", ["s3", "postgres", "redis"])
def test_outage_destroys_no_work(dependency: str, fault_stack: FaultStack, receiver: Receiver, tmp_path: Path) -> None:
    stack = fault_stack.stack
    proxy = fault_stack.proxies[dependency]
    model_dir = write_model_dir(tmp_path / "tiny")
    with stack.client() as client:
        hook = client.post("/v1/webhooks", json={"url": receiver.url, "events": HOOK_EVENTS})
        assert hook.status_code == 201, hook.text
        secret = hook.json()["secret"]
        model = upload_files(client, {}, {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()})
        evaluation = upload_files(client, {}, {"eval.txt": sample_text(4).encode()})
        spec = {
            "model": {"upload_id": model},
            "steps": [{"method": "quantize", "scheme": "w8a16", "algorithm": "rtn"}],
            "evaluation": {"upload_id": evaluation, "seq_len": 64},
            "metadata": {"suite": "fault", "outage": dependency},
        }
        stack.start_worker()
        # Half the queue exists before a broker outage, the rest is submitted during it (the API takes jobs
        # while only the doorbell is down: they must be rung once it is back). Without the database or the
        # storage (where the inputs are checked) the API answers 503 instead: the whole queue comes first.
        before = (FAULT_JOBS + 1) // 2 if dependency == "redis" else FAULT_JOBS
        job_ids = [_submit(client, spec) for _ in range(before)]
        running = _until(
            "a job to be running",
            lambda: next((j for j, status in _statuses(client, job_ids).items() if status == "running"), None),
            timeout=180,
        )

        proxy.cut()
        cut_at = time.monotonic()
        if dependency == "redis":
            job_ids += [_submit(client, spec) for _ in range(FAULT_JOBS - before)]
        else:
            _assert_outage_is_503(client, spec, job_ids[0], dependency)
        time.sleep(max(cut_at + OUTAGE_S - time.monotonic(), 0))  # the outage itself is the scenario's one timed wait
        if dependency != "postgres":
            # A job meets a storage or broker outage only at certain points (fetching inputs, publishing
            # artifacts, taking the next message); a tiny job computes for a while in between. The outage
            # lasts until the job that was running when it began has met it and left "running" (published,
            # released, or failed), so every scenario tests what it names. (A database outage is met at
            # once: the lease heartbeat writes every second.)
            _until(
                f"job {running} to meet the outage",
                lambda: _status_in_database(running) != "running",
                timeout=60 * 10,
                every=1.0,
            )
        proxy.restore()
        restored_at = datetime.now(UTC)

        try:
            final = _until(
                f"all {len(job_ids)} jobs to end",
                lambda: (s := _statuses(client, job_ids)) and set(s.values()) <= TERMINAL and s,
                timeout=120 + 60 * len(job_ids),  # a tiny job takes 10-60 s on a loaded 2-core machine
                every=1.0,
            )
        except AssertionError as exc:
            events = [(e.job_id, e.type, e.data, e.created_at.time().isoformat()) for e in job_events(*job_ids)]
            raise AssertionError(f"{exc}\n{_statuses(client, job_ids)}\n{events}\n{stack.logs()}") from None
    assert final == dict.fromkeys(job_ids, "succeeded"), _failures(job_ids)
    events = job_events(*job_ids)
    _assert_attempts_never_overlap(events)
    _assert_no_worker_counted_lost(events)
    _assert_queue_resumed(events, restored_at)
    _assert_nothing_unowned(fault_stack, job_ids)
    _assert_webhooks_delivered_in_order(receiver, secret, events)


def _assert_outage_is_503(client: httpx.Client, spec: dict[str, Any], job_id: str, dependency: str) -> None:
    """Clients can tell an outage from a bug: 503 + Retry-After naming the dependency, never a 500."""
    submit = client.post("/v1/jobs", json=spec)
    answers = (
        [submit, client.get(f"/v1/jobs/{job_id}"), client.get("/v1/jobs")] if dependency == "postgres" else [submit]
    )
    for response in answers:
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["dependency"] == {"postgres": "database", "s3": "storage"}[dependency]


def _status_in_database(job_id: str) -> str:
    """Read past the API, whose rate limiter may need the very broker that is down."""
    from app.db import session_scope
    from app.jobs.models import Job

    with session_scope() as session:
        return str(session.scalar(select(Job.status).where(Job.id == job_id)))


def _failures(job_ids: list[str]) -> str:
    from app.db import session_scope
    from app.jobs.models import Job

    with session_scope() as session:
        jobs = session.scalars(select(Job).where(Job.id.in_(job_ids), Job.status != "succeeded")).all()
        return "\n".join(f"{j.id} {j.status} {j.error_type}: {j.error_message}" for j in jobs)


def _assert_attempts_never_overlap(events: list[Any]) -> None:
    """An attempt starts (``job.started``) only once the job's previous attempt ended: it was re-queued
    (``job.retrying``) or reached a terminal state. Two ``job.started`` in a row mean two runs at once."""
    running: dict[str, int] = {}
    for event in events:
        if event.type == "job.started":
            attempt = event.data["attempt"]
            assert event.job_id not in running, (
                f"{event.job_id}: attempt {attempt} started while attempt {running[event.job_id]} was running"
            )
            running[event.job_id] = attempt
        elif event.type in ATTEMPT_ENDS:
            running.pop(event.job_id, None)


def _assert_no_worker_counted_lost(events: list[Any]) -> None:
    """No worker died, so the reaper re-queued no job for a lost worker: a lease that ran out during the
    outage (the fault stack's lease is 4 s, the outage longer) was the outage's, and the reaper waits a lease
    period after it before judging leases. Attempts released for the outage itself are not counted."""
    lost = [(e.job_id, e.data) for e in events if e.type == "job.retrying" and not e.data.get("infrastructure")]
    assert lost == [], lost


def _assert_queue_resumed(events: list[Any], restored_at: datetime) -> None:
    """The worker takes a job within 30 s of being free again: of the recovery, or, when it was busy with a
    job that ran through the outage, of that attempt's end (the queue waits behind one worker by design)."""
    starts = [e.created_at for e in events if e.type == "job.started" and e.created_at >= restored_at]
    assert starts, "no job started after the recovery"
    first = min(starts)
    free_since = max([restored_at, *(e.created_at for e in events if e.type in ATTEMPT_ENDS and e.created_at <= first)])
    waited = first - free_since
    assert waited <= timedelta(seconds=RESUME_WITHIN_S), f"the worker was free for {waited} before a job started"


def _assert_nothing_unowned(fault_stack: FaultStack, job_ids: list[str]) -> None:
    from app.db import session_scope
    from app.jobs.models import Job
    from app.storage_keys import upload_key
    from app.uploads.models import Upload

    with session_scope() as session:
        jobs = session.scalars(select(Job).where(Job.id.in_(job_ids))).all()
        [tenant] = {j.tenant_id for j in jobs}
        owned = [upload_key(tenant, u.id) for u in session.scalars(select(Upload).where(Upload.tenant_id == tenant))]
        # A job owns the attempt its manifest is in, and nothing else (no other attempt, no checkpoint).
        owned += [j.manifest_key.rsplit("/", 1)[0] + "/" for j in jobs if j.manifest_key]
    s3 = boto3.client("s3", endpoint_url=_direct_s3(fault_stack), region_name="us-east-1")
    keys = [  # this test's tenant's keys: the bucket is shared with the other tests of the session
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for o in page.get("Contents", [])
        if o["Key"].split("/")[1:2] == [tenant]
    ]
    assert [k for k in keys if not k.startswith(tuple(owned))] == []
    # And what is owned is there: every upload and every published attempt.
    assert [p for p in owned if not any(k.startswith(p) for k in keys)] == []
    # Cleanup runs after the job's final state is written: give the worker's finally a moment.
    _until(
        "the worker's scratch space to be empty",
        lambda: not [p for p in fault_stack.work_dir.rglob("*") if p.is_file()],
        timeout=30,
    )


def _direct_s3(fault_stack: FaultStack) -> str:
    host, port = fault_stack.proxies["s3"].upstream
    return f"http://{host}:{port}"


def _assert_webhooks_delivered_in_order(receiver: Receiver, secret: str, events: list[Any]) -> None:
    from app.db import session_scope
    from app.webhooks.models import WebhookDelivery

    def deliveries() -> list[WebhookDelivery]:
        with session_scope() as session:
            rows = list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.seq)))
        return rows if rows and all(r.status == "delivered" for r in rows) else []

    rows = _until("every webhook delivery to be delivered", deliveries, timeout=120)
    # At least once: every event of a subscribed type has a delivery, and the receiver got each one.
    hooked = [e.id for e in events if e.type in HOOK_EVENTS]
    assert sorted(r.payload["data"]["event_id"] for r in rows) == sorted(hooked)
    first_arrival: dict[str, int] = {}
    for index, request in enumerate(receiver.requests):
        verify(request, secret)  # signed by the service, not forged by the proxy or garbled
        first_arrival.setdefault(request.headers["webhook-id"], index)
    missing = [r.id for r in rows if r.id not in first_arrival]
    assert missing == [], f"{len(missing)} deliveries never reached the receiver"
    # In order per endpoint (one endpoint here): first arrivals follow the outbox order.
    arrivals = [first_arrival[r.id] for r in rows]
    assert arrivals == sorted(arrivals), "webhooks arrived out of order"
