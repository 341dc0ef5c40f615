"""Public response shapes of the jobs API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.jobs.models import Job, JobEvent

JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]


class Progress(BaseModel):
    fraction: float = Field(ge=0.0, le=1.0)
    message: str


class JobError(BaseModel):
    type: str
    message: str


class StepState(BaseModel):
    index: int
    method: str
    status: Literal["pending", "running", "succeeded", "failed", "cancelled"]
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None


class JobOut(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    progress: Progress
    steps: list[StepState]
    error: JobError | None
    metadata: dict[str, str]
    summary: dict[str, Any] | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: dict[str, Any]
    webhook_secret: str | None = Field(
        default=None, description="whsec_… secret of the one-off webhook_url; only in the creating response"
    )

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls(
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


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]
    has_more: bool


class EventOut(BaseModel):
    id: int
    type: str
    data: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, event: JobEvent) -> EventOut:
        return cls(id=event.id, type=event.type, data=event.data, created_at=event.created_at)


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventOut]
    has_more: bool


class ArtifactOut(BaseModel):
    path: str
    size: int
    sha256: str
    url: str
    expires_at: datetime


class ArtifactList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ArtifactOut]
    manifest_sha256: str
