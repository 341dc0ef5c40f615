"""The sweeps remove the scratch directories, attempt artifacts and checkpoints that no live attempt owns,
and nothing a live attempt (or the published one) owns — against real Postgres and an S3 server."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import model_files, register_upload, submit_job
from tests.tiny import write_model_dir


@pytest.fixture
def jobs(pg_stack: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """Jobs in every state a sweep must tell apart, by name → (tenant, job id) as ``tenant/job``.

    - ``running``: attempt 2 runs now (attempt 1 was interrupted);
    - ``released``: queued again after attempt 1 met an outage;
    - ``succeeded``: attempt 2 published its manifest, attempt 1 left files behind;
    - ``failed``: ended on attempt 1.
    """
    from sqlalchemy import update

    from app.auth.service import create_tenant
    from app.db import session_scope
    from app.jobs.models import Job
    from app.storage_keys import manifest_key

    with session_scope() as session:
        tenant = create_tenant(session, "sweep").id
    upload = register_upload(tenant, model_files(write_model_dir(tmp_path / "m")))
    spec = {"model": {"upload_id": upload}, "steps": [{"method": "quantize", "scheme": "w8a16"}]}
    rows = {
        "running": {"status": "running", "attempts": 2, "worker_id": "elsewhere:1"},
        "released": {"status": "queued", "attempts": 1},
        "succeeded": {"status": "succeeded", "attempts": 2},
        "failed": {"status": "failed", "attempts": 1},
    }
    ids = {}
    for name, values in rows.items():
        job_id = submit_job(tenant, spec)
        if name == "succeeded":
            values = {**values, "manifest_key": manifest_key(tenant, job_id, 2)}
        with session_scope() as session:
            session.execute(update(Job).where(Job.id == job_id).values(**values))
        ids[name] = f"{tenant}/{job_id}"
    return ids


def _job_id(ref: str) -> str:
    return ref.split("/")[1]


def test_scratch_sweep_removes_only_directories_no_live_attempt_owns(jobs: dict[str, str]) -> None:
    from app.config import get_settings
    from workers.sweep import scratch_dir, sweep_scratch

    settings = get_settings()
    layout = {
        ("running", 1): False,  # interrupted earlier attempt
        ("running", 2): True,  # the live attempt, whichever host runs it
        ("running", 3): True,  # claimed after the sweep read the row: never touched
        ("released", 1): False,
        ("succeeded", 2): False,
        ("failed", 1): False,
    }
    for (name, attempt), _ in layout.items():
        path = scratch_dir(settings, _job_id(jobs[name]), attempt)
        (path / "output").mkdir(parents=True)
        (path / "output" / "model.safetensors").write_bytes(b"x")
    gone_job = scratch_dir(settings, "job_deleted", 1)
    gone_job.mkdir(parents=True)
    not_an_attempt = settings.resolved_work_dir() / _job_id(jobs["failed"]) / "notes"
    not_an_attempt.mkdir()

    removed = set(sweep_scratch(settings))
    for (name, attempt), kept in layout.items():
        path = scratch_dir(settings, _job_id(jobs[name]), attempt)
        assert path.exists() is kept, (name, attempt)
        assert (path in removed) is not kept
    assert not gone_job.exists() and not gone_job.parent.exists()
    assert not_an_attempt.exists()  # only attempt-N directories are the sweep's


def test_storage_sweep_removes_dead_attempts_and_ended_jobs_checkpoints(jobs: dict[str, str]) -> None:
    from app.storage import get_storage
    from app.storage_keys import artifact_prefix, checkpoint_prefix
    from workers.sweep import sweep_storage

    storage = get_storage()

    def attempt(name: str, number: int) -> str:
        tenant, job_id = jobs[name].split("/")
        return artifact_prefix(tenant, job_id, number)

    def checkpoints(name: str) -> str:
        tenant, job_id = jobs[name].split("/")
        return checkpoint_prefix(tenant, job_id)

    expected = {
        attempt("running", 1): False,
        attempt("running", 2): True,
        attempt("released", 1): False,
        attempt("succeeded", 1): False,
        attempt("succeeded", 2): True,  # published: the job's artifacts
        attempt("failed", 1): False,
        checkpoints("running"): True,
        checkpoints("released"): True,  # its next attempt resumes from them
        checkpoints("failed"): False,
        "artifacts/tenant_gone/job_gone/attempt-1/": False,
        "checkpoints/tenant_gone/job_gone/": False,
    }
    for prefix in expected:
        storage.put_bytes(prefix + "model/model.safetensors", b"x")
        storage.put_bytes(prefix + "manifest.json", b"{}")

    result = sweep_storage(storage)
    for prefix, kept in expected.items():
        assert bool(storage.list(prefix)) is kept, prefix
    # (The bucket is shared by the session's tests: other tests' leftovers may be swept too.)
    removed = set(result.attempts + result.checkpoints)
    assert {p for p, kept in expected.items() if not kept} <= removed
    assert not {p for p, kept in expected.items() if kept} & removed
    # Idempotent: nothing left to remove.
    again = sweep_storage(storage)
    assert again.attempts == [] and again.checkpoints == []
