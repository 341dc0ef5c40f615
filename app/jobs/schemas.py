"""The jobs API's responses built from rows. The shapes are the shared wire models (:mod:`modelpress.schemas`)."""

from __future__ import annotations

from app.jobs.models import Job, JobEvent, JobView
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
    "event_out",
    "job_out",
]


def job_out(job: Job | JobView) -> JobOut:
    return JobOut(
        id=job.id,
        status=job.status,  # type: ignore[arg-type]
        progress=Progress(fraction=job.progress, message=job.progress_message),
        steps=[StepState(**s) for s in job.steps],
        error=JobError(type=job.error_type, message=job.error_message or "") if job.error_type else None,
        metadata=job.metadata_dict,
        summary=job.summary,
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        spec=job.spec,
        # Set only by create_job on the instance it returns (see app.jobs.service.create_job).
        webhook_secret=getattr(job, "webhook_secret", None),
    )


def event_out(event: JobEvent) -> EventOut:
    return EventOut.model_validate(event, from_attributes=True)
