"""Whoever ends a job (its worker, the reaper, a cancel), no step is left ``running``; attempts released after
an outage are not the user's; a cancelled step is reported as cancelled, not failed."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    job_event_types,
    job_events,
    load_job,
    model_files,
    reap_with_sight,
    register_upload,
    submit_job,
)
from tests.tiny import write_model_dir

STEPS = [
    {"method": "prune", "algorithm": "magnitude", "sparsity": 0.5},
    {"method": "quantize", "scheme": "w8a16"},
    {"method": "quantize", "scheme": "w8a16"},
]


@pytest.fixture
def running_job(pg_stack: dict[str, str], tmp_path: Path) -> str:
    """A job claimed by ``worker-1`` on attempt 1, in its second step: steps ``succeeded, running, pending``."""
    from app.auth.service import create_tenant
    from app.db import session_scope
    from app.jobs import lifecycle

    with session_scope() as session:
        tenant = create_tenant(session, "steps").id
    job_id = submit_job(
        tenant,
        {"model": {"upload_id": register_upload(tenant, model_files(write_model_dir(tmp_path / "m")))}, "steps": STEPS},
    )
    with session_scope() as session:
        assert lifecycle.claim(session, job_id, "worker-1", 60)
        steps = [dict(step) for step in load_job(job_id).steps]
        steps[0]["status"], steps[1]["status"] = "succeeded", "running"
        assert lifecycle.set_steps(session, job_id, "worker-1", steps)
    return job_id


def _statuses(job_id: str) -> list[str]:
    return [step["status"] for step in load_job(job_id).steps]


def _expire_lease(job_id: str, **values: Any) -> None:
    from sqlalchemy import update

    from app.db import session_scope, utcnow
    from app.jobs.models import Job

    values.setdefault("lease_expires_at", utcnow() - timedelta(seconds=1))
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def test_a_job_failed_by_the_reaper_leaves_no_step_running(running_job: str) -> None:

    _expire_lease(running_job, attempts=3)  # its last attempt: the reaper gives up
    assert reap_with_sight()["failed_or_cancelled"] == 1
    job = load_job(running_job)
    assert job.status == "failed" and job.error_type == "worker_lost"
    assert _statuses(running_job) == ["succeeded", "failed", "pending"]
    assert job.progress_message == "failed"
    assert job_event_types(running_job)[-2:] == ["job.step.failed", "job.failed"]


def test_a_cancelled_job_says_its_running_step_was_cancelled(running_job: str) -> None:
    from app.db import session_scope
    from app.jobs import lifecycle

    with session_scope() as session:
        assert lifecycle.request_cancel(session, running_job) == "cancelling"
    with session_scope() as session:
        assert lifecycle.mark_cancelled(session, running_job, "worker-1")
    job = load_job(running_job)
    assert _statuses(running_job) == ["succeeded", "cancelled", "pending"]
    assert job.progress_message == "cancelled"
    assert job_event_types(running_job)[-2:] == ["job.step.cancelled", "job.cancelled"]


def test_a_requeued_job_runs_its_interrupted_step_again(running_job: str) -> None:

    _expire_lease(running_job)
    assert reap_with_sight()["requeued"] == 1
    job = load_job(running_job)
    assert job.status == "queued"
    assert _statuses(running_job) == ["succeeded", "pending", "pending"]
    assert "started_at" not in job.steps[1]


def test_attempts_released_after_outages_do_not_count_against_max_attempts(running_job: str) -> None:
    """Attempt 3 of a job whose first two were released after outages is the user's first: the reaper
    re-queues it instead of giving up after max_attempts = 3."""

    _expire_lease(running_job, attempts=3, infra_retries=2)
    assert reap_with_sight()["requeued"] == 1
    assert load_job(running_job).status == "queued"
    assert job_event_types(running_job)[-1] == "job.retrying"


def test_releases_are_capped_then_the_job_fails_with_a_readable_reason(running_job: str) -> None:
    from app.db import session_scope
    from app.jobs import lifecycle

    with session_scope() as session:
        assert lifecycle.release_for_retry(session, running_job, "worker-1", "storage", 1) == 1
    assert _statuses(running_job) == ["succeeded", "pending", "pending"]
    with session_scope() as session:
        assert lifecycle.claim(session, running_job, "worker-2", 60)
    with session_scope() as session:  # the second outage in a row, with one release allowed
        assert lifecycle.release_for_retry(session, running_job, "worker-2", "storage", 1) is None
    job = load_job(running_job)
    assert job.status == "failed" and job.error_type == "infrastructure_unavailable"
    assert job.error_message.startswith("the service's storage was unreachable; the job was retried 1 times")


def test_a_release_of_a_job_being_cancelled_cancels_it_and_a_stranger_releases_nothing(running_job: str) -> None:
    from app.db import session_scope
    from app.jobs import lifecycle

    with session_scope() as session:
        assert lifecycle.release_for_retry(session, running_job, "worker-9", "database", 5) is None
    assert load_job(running_job).status == "running"  # not this worker's job
    with session_scope() as session:
        assert lifecycle.request_cancel(session, running_job) == "cancelling"
    with session_scope() as session:
        assert lifecycle.release_for_retry(session, running_job, "worker-1", "database", 5) is None
    assert load_job(running_job).status == "cancelled"
    assert _statuses(running_job) == ["succeeded", "cancelled", "pending"]


def test_the_pipeline_reports_a_cancelled_step_as_cancelled() -> None:
    from app.jobs.spec import JobSpec
    from workers.compression.base import Callbacks, StepCancelled
    from workers.pipeline import _run_steps

    recipe = JobSpec.model_validate({"model": {"upload_id": "upl_x"}, "steps": STEPS}).recipe()
    seen: list[tuple[int, str]] = []

    def run_one(index: int, _step: Any, _model: Any, _callbacks: Callbacks) -> Any:
        raise StepCancelled

    with pytest.raises(StepCancelled):
        _run_steps(recipe, run_one, Callbacks(), lambda index, status, _extra: seen.append((index, status)))
    assert seen == [(0, "running"), (0, "cancelled")]


def test_a_lease_that_ran_out_in_an_outage_is_judged_a_lease_period_after_it(running_job: str) -> None:
    """The reaper's first pass after a database outage longer than the lease re-queues nothing: the worker
    could not renew its lease either. Once the reaper has reached the database, pass after pass, for a
    whole lease period, the lease is judged. Here the worker never came back (it gave up waiting to record
    the outage): the job is re-queued as the outage's, not counted against the user's attempts."""
    from app.config import get_settings
    from app.db import utcnow
    from workers.reaper import DatabaseSight, reap_once

    settings = get_settings()
    now = [1000.0]
    sight = DatabaseSight(clock=lambda: now[0])
    sight.reached(max_gap_s=1e9)  # a pass before the outage
    outage_s = 10 * settings.lease_s
    now[0] += outage_s  # the outage: no pass reached the database for ten lease periods
    _expire_lease(running_job, lease_expires_at=utcnow() - timedelta(seconds=outage_s / 2))  # ran out in it
    assert reap_once(sight)["requeued"] == 0  # the first pass after it
    assert load_job(running_job).status == "running"
    passes = 0
    while load_job(running_job).status == "running":
        now[0] += settings.reaper_interval_s
        reap_once(sight)
        passes += 1
        assert passes * settings.reaper_interval_s <= settings.lease_s + settings.reaper_interval_s
    assert passes * settings.reaper_interval_s >= settings.lease_s
    job = load_job(running_job)
    assert job.status == "queued" and (job.attempts, job.infra_retries) == (1, 1)
    retrying = [e for e in job_events(running_job) if e.type == "job.retrying"]
    assert [e.data["infrastructure"] for e in retrying] == [True]


def test_a_lease_that_ran_out_in_sight_of_the_database_is_a_lost_worker(running_job: str) -> None:
    from workers.reaper import DatabaseSight, reap_once

    now = [1000.0]
    sight = DatabaseSight(clock=lambda: now[0])
    for _ in range(100):  # the reaper has reached the database every second for 100 s
        sight.reached(max_gap_s=3)
        now[0] += 1
    _expire_lease(running_job)  # ran out a second ago: its worker stopped renewing while the database answered
    assert reap_once(sight)["requeued"] == 1
    job = load_job(running_job)
    assert job.status == "queued" and (job.attempts, job.infra_retries) == (1, 0)
    [retrying] = [e for e in job_events(running_job) if e.type == "job.retrying"]
    assert retrying.data["reason"] == "worker lost (lease expired)"


def test_database_sight_counts_unbroken_access_and_restarts_after_a_gap() -> None:
    from workers.reaper import DatabaseSight

    now = [0.0]
    sight = DatabaseSight(clock=lambda: now[0])
    assert sight.unbroken_s(max_gap_s=15) == 0.0  # never reached
    for _ in range(12):  # a pass every 5 s for a minute
        sight.reached(max_gap_s=15)
        now[0] += 5
    assert sight.unbroken_s(max_gap_s=15) == 60.0
    now[0] += 30  # no pass for 30 s: a gap
    assert sight.unbroken_s(max_gap_s=15) == 0.0
    sight.reached(max_gap_s=15)
    now[0] += 5
    assert sight.unbroken_s(max_gap_s=15) == 5.0  # counted again from the pass after the gap
