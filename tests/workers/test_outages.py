"""An outage is not the user's failure: the worker releases the attempt and retries it, or does not claim
the job at all, against real Postgres, Redis and an S3 server. Every outage is a real refused connection (a
dependency pointed at a loopback port nobody listens on); a dependency "comes back" on a signal the test
controls (the probe's injected sleep), never after a timed wait."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helpers import (
    REDIS_URL,
    apply_env,
    free_port,
    job_event_types,
    load_job,
    model_files,
    register_upload,
    submit_job,
)
from tests.tiny import write_model_dir


@pytest.fixture
def tenant(pg_stack: dict[str, str]) -> str:
    from app.auth.service import create_tenant
    from app.db import session_scope

    with session_scope() as session:
        return create_tenant(session, "outage").id


@pytest.fixture
def job_id(tenant: str, tmp_path: Path) -> str:
    """A queued w8a16 job of a tiny model; the queue is emptied of its submission doorbell."""
    model = register_upload(tenant, model_files(write_model_dir(tmp_path / "m")))
    job = submit_job(tenant, {"model": {"upload_id": model}, "steps": [{"method": "quantize", "scheme": "w8a16"}]})
    redis.Redis.from_url(REDIS_URL).flushdb()
    return job


def _dead_storage() -> Any:
    from app.config import get_settings
    from app.storage import S3Storage

    settings = get_settings().model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{free_port()}"})
    return S3Storage(settings)


def _doorbells() -> list[dict[str, Any]]:
    """The job messages waiting in Redis (every priority level of the cpu queue)."""
    queues = redis.Redis.from_url(REDIS_URL)
    return [json.loads(raw) for key in queues.keys("cpu*") for raw in queues.lrange(key, 0, -1)]


def _last_event(job_id: str) -> tuple[str, dict[str, Any]]:
    from sqlalchemy import select

    from app.db import session_scope
    from app.jobs.models import JobEvent

    with session_scope() as session:
        event = session.execute(
            select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc()).limit(1)
        ).scalar_one()
        return event.type, dict(event.data)


def test_storage_outage_during_input_fetch_releases_the_attempt_for_a_delayed_retry(job_id: str) -> None:
    from app.config import get_settings
    from workers.readiness import DependencyProbe
    from workers.runner import JobRunner
    from workers.sweep import scratch_dir

    # The gate let the job in; the storage went down right after (an empty probe always answers "ready").
    JobRunner(job_id, storage=_dead_storage(), probe=DependencyProbe({})).run()

    job = load_job(job_id)
    assert (job.status, job.attempts, job.infra_retries, job.error_type) == ("queued", 1, 1, None)
    assert job.worker_id is None and job.lease_expires_at is None
    assert job.progress_message == "waiting: the storage was unreachable; retrying"
    kind, data = _last_event(job_id)
    assert kind == "job.retrying"
    assert data == {"reason": "storage unavailable", "infrastructure": True, "infra_retries": 1}
    assert "job.failed" not in job_event_types(job_id)
    # Rung again, delayed by the first back-off step, not at once and not after the reaper's 300 s.
    (message,) = _doorbells()
    assert job_id in message["headers"]["argsrepr"] and message["headers"]["eta"] is not None
    # The cleanup ran although the storage was down: no scratch directory is left.
    assert not scratch_dir(get_settings(), job_id, 1).exists()


def test_a_missing_upload_object_is_the_users_not_an_outage(tenant: str, job_id: str) -> None:
    from app.db import session_scope
    from app.storage import get_storage
    from app.storage_keys import upload_key
    from app.uploads.models import Upload
    from workers.readiness import DependencyProbe
    from workers.runner import JobRunner

    upload_id = load_job(job_id).spec["model"]["upload_id"]
    with session_scope() as session:
        files = session.get(Upload, upload_id).files  # type: ignore[union-attr]
    get_storage().delete_prefix(upload_key(tenant, upload_id, files[0]["path"]))

    JobRunner(job_id, probe=DependencyProbe({})).run()
    job = load_job(job_id)
    assert job.status == "failed" and job.error_type == "invalid_input"
    assert job.error_message == f"model: {files[0]['path']} of upload {upload_id} is gone from storage"


def test_the_gate_does_not_claim_while_storage_is_down_and_claims_once_it_answers(job_id: str) -> None:
    from app.config import get_settings
    from app.storage import get_storage
    from workers.failures import DependenciesUnavailable
    from workers.readiness import DependencyProbe, check_database
    from workers.runner import JobRunner

    storage = {"now": _dead_storage()}
    probe = DependencyProbe(
        {"database": check_database, "storage": lambda: storage["now"].check()}, sleep=lambda _s: None
    )
    settings = get_settings().model_copy(update={"dependency_wait_s": 0.0})
    with pytest.raises(DependenciesUnavailable) as raised:
        JobRunner(job_id, settings=settings, probe=probe).run()
    assert raised.value.down == ["storage"]
    job = load_job(job_id)
    assert (job.status, job.attempts) == ("queued", 0)  # never claimed: the message goes back to the broker

    def storage_back(_seconds: float) -> None:
        storage["now"] = get_storage()

    probe.sleep = storage_back  # the outage ends while the worker waits, holding the message
    JobRunner(job_id, probe=probe).run()
    job = load_job(job_id)
    assert job.status == "succeeded" and job.attempts == 1, job.error_message


def test_a_database_outage_at_claim_hands_the_message_back(
    job_id: str, monkeypatch: pytest.MonkeyPatch, pg_stack: dict[str, str]
) -> None:
    from workers.failures import DependenciesUnavailable
    from workers.readiness import DependencyProbe
    from workers.runner import JobRunner

    apply_env(monkeypatch, {**pg_stack, "MODELPRESS_DATABASE_URL": f"postgresql+psycopg://x@127.0.0.1:{free_port()}/x"})
    with pytest.raises(DependenciesUnavailable) as raised:
        JobRunner(job_id, probe=DependencyProbe({})).run()
    assert raised.value.down == ["database"]
    apply_env(monkeypatch, pg_stack)
    job = load_job(job_id)
    assert (job.status, job.attempts) == ("queued", 0)


def test_a_database_outage_inside_a_running_job_releases_it_once_the_database_answers(
    job_id: str, monkeypatch: pytest.MonkeyPatch, pg_stack: dict[str, str]
) -> None:
    from workers import runner as runner_module
    from workers.readiness import DependencyProbe, check_database

    original = runner_module.Attempt.execute

    def database_goes_down(self: Any, spec: Any) -> Any:
        dead = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x"
        apply_env(monkeypatch, {**pg_stack, "MODELPRESS_DATABASE_URL": dead})
        return original(self, spec)  # its first progress write meets the outage

    monkeypatch.setattr(runner_module.Attempt, "execute", database_goes_down)
    probe = DependencyProbe({"database": check_database}, sleep=lambda _s: apply_env(monkeypatch, pg_stack))
    runner_module.JobRunner(job_id, probe=probe).run()

    job = load_job(job_id)
    assert (job.status, job.attempts, job.infra_retries, job.error_type) == ("queued", 1, 1, None)
    assert _last_event(job_id) == (
        "job.retrying",
        {"reason": "database unavailable", "infrastructure": True, "infra_retries": 1},
    )
    assert len(_doorbells()) == 1


def test_backoff_doubles_from_the_first_delay_up_to_its_cap() -> None:
    from app.config import Settings
    from workers.runner import infra_backoff_s

    settings = Settings(infra_retry_backoff_s=5, infra_retry_max_backoff_s=60)
    assert [infra_backoff_s(settings, n) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]


def test_the_task_hands_back_a_job_it_could_not_claim_and_runs_it_when_redelivered(
    job_id: str, monkeypatch: pytest.MonkeyPatch, pg_stack: dict[str, str]
) -> None:
    """The Celery task wiring: an outage at the gate becomes ``Task.retry`` (run eagerly here: the retry is
    the next delivery at once), never an acked message whose job nobody runs; and the worker sweeps the
    scratch directory a killed worker left behind."""
    from app.config import get_settings
    from workers import runner as runner_module
    from workers import sweep
    from workers.readiness import DependencyProbe
    from workers.tasks import run_job

    looks: list[str] = []

    def storage_down_at_first_look() -> None:
        looks.append("storage")
        if len(looks) == 1:
            raise ConnectionRefusedError("storage down")

    probe = DependencyProbe({"storage": storage_down_at_first_look})
    monkeypatch.setattr(runner_module, "worker_probe", lambda: probe)
    apply_env(monkeypatch, {**pg_stack, "MODELPRESS_DEPENDENCY_WAIT_S": "0"})

    left_behind = sweep.scratch_dir(get_settings(), "job_of_a_killed_worker", 1)
    left_behind.mkdir(parents=True)
    monkeypatch.setattr(sweep, "_last_scratch_sweep", float("-inf"))

    result = run_job.apply(args=[job_id])
    assert result.state == "SUCCESS" and len(looks) == 2
    assert not left_behind.exists()
    job = load_job(job_id)
    assert job.status == "succeeded" and job.attempts == 1, job.error_message


def test_a_maintenance_task_skips_an_outage_with_one_warning_as_it_begins_and_one_as_it_ends(
    pg_stack: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """At a beat every few seconds, a traceback per run buried the maintenance log in a long outage."""
    from workers.tasks import MaintenanceSkipped, reap

    caplog.set_level(logging.INFO)
    apply_env(monkeypatch, {**pg_stack, "MODELPRESS_DATABASE_URL": f"postgresql+psycopg://x@127.0.0.1:{free_port()}/x"})
    for _ in range(3):
        run = reap.apply()  # through Celery's tracer, as the worker runs it
        assert run.failed() and isinstance(run.result, MaintenanceSkipped)
        assert str(run.result) == "the database is unreachable"
    apply_env(monkeypatch, pg_stack)
    assert reap.apply().get() == {"requeued": 0, "failed_or_cancelled": 0, "resent": 0}
    assert reap.apply().get() == {"requeued": 0, "failed_or_cancelled": 0, "resent": 0}

    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("reap: the database is unreachable (")
    assert warnings[1] == "reap: the database answers again"
    assert not [r for r in caplog.records if r.exc_info], "no traceback for an outage"


def test_a_maintenance_task_still_raises_what_is_no_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.reaper
    from workers.tasks import reap

    def broken(*_: Any) -> dict[str, int]:
        raise ValueError("a bug")

    monkeypatch.setattr(workers.reaper, "reap_once", broken)
    with pytest.raises(ValueError, match="a bug"):
        reap()
