"""The jobs API's responses built from rows. The shapes are the shared wire models (:mod:`modelpress.schemas`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.jobs.models import Job
from modelpress.schemas import (
    ArtifactList,
    ArtifactOut,
    EventList,
    EventOut,
    JobError,
    JobList,
    JobOut,
    JobStatus,
    Progress,
    StepState,
)

__all__ = [
    "ArtifactList",
    "ArtifactOut",
    "EventList",
    "EventOut",
    "JobList",
    "JobOut",
    "JobStatus",
    "job_out",
    "job_out_from",
]


# The job columns a JobOut is built from: what the Core read of one job selects (app.jobs.service.read_job).
JOB_OUT_COLUMNS = (
    "id", "status", "progress", "progress_message", "steps", "error_type", "error_message", "summary", "attempts",
    "created_at", "started_at", "finished_at", "spec",
)  # fmt: skip


def job_out(job: Job) -> JobOut:
    # webhook_secret: set only by create_job on the instance it returns (see app.jobs.service.create_job).
    columns = {name: getattr(job, name) for name in JOB_OUT_COLUMNS}
    return job_out_from(columns, job.metadata_dict, getattr(job, "webhook_secret", None))


def job_out_from(columns: Mapping[str, Any], metadata: dict[str, str], webhook_secret: str | None = None) -> JobOut:
    """A job's response from its :data:`JOB_OUT_COLUMNS` (a row, or a mapped instance's attributes)."""
    return JobOut(
        id=columns["id"],
        status=columns["status"],
        progress=Progress(fraction=columns["progress"], message=columns["progress_message"]),
        steps=[StepState(**s) for s in columns["steps"]],
        error=JobError(type=columns["error_type"], message=columns["error_message"] or "")
        if columns["error_type"]
        else None,
        metadata=metadata,
        summary=columns["summary"],
        attempts=columns["attempts"],
        created_at=columns["created_at"],
        started_at=columns["started_at"],
        finished_at=columns["finished_at"],
        spec=columns["spec"],
        webhook_secret=webhook_secret,
    )
