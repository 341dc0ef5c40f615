"""The reaper re-sends lost doorbells with the job's tenant priority, not the middle level."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import model_files, register_upload, submit_job
from tests.tiny import write_model_dir


def test_resent_doorbells_keep_each_tenants_priority(
    embedded_stack: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy import update

    from app import broker
    from app.auth.service import create_tenant
    from app.db import session_scope, utcnow
    from app.jobs.models import Job
    from workers import reaper

    sent: list[tuple[str, int]] = []

    class Recorder:
        def send_task(self, _name: str, *, args: list[Any], priority: int, **_kwargs: Any) -> None:
            sent.append((args[0], priority))

    monkeypatch.setattr(broker, "get_celery", Recorder)
    with session_scope() as session:
        high = create_tenant(session, "vip", priority=9).id
        low = create_tenant(session, "batch", priority=0).id
    jobs = {
        tenant: submit_job(
            tenant,
            {
                "model": {"upload_id": register_upload(tenant, model_files(write_model_dir(tmp_path / tenant)))},
                "steps": [{"method": "quantize", "scheme": "w8a16"}],
            },
        )
        for tenant in (high, low)
    }
    submitted = dict(sent)
    assert submitted[jobs[high]] != submitted[jobs[low]]
    sent.clear()
    with session_scope() as session:  # nobody claimed them for an hour: the doorbells may be lost
        session.execute(update(Job).values(updated_at=utcnow() - timedelta(hours=1)))
    assert reaper.reap_once()["resent"] >= 2
    assert {job: priority for job, priority in sent if job in submitted} == submitted
