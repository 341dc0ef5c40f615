"""HTTP routes of /v1/jobs. Thin: parse, call the service, shape the response."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import Field
from pydantic.json_schema import SkipJsonSchema

from app.db import JSON_INT_MAX
from app.deps import JobsReader, JobsWriter, RequestPathDep, SessionDep, SettingsDep, StorageDep
from app.jobs import service
from app.jobs.models import TERMINAL_STATUSES
from app.jobs.schemas import ArtifactList, EventList, EventOut, JobList, JobOut, JobStatus, job_out
from app.jobs.spec import JobSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=201, response_model=JobOut)
def create_job(
    spec: JobSpec,
    principal: JobsWriter,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JobOut:
    """Submit a compression job. Replaying the same Idempotency-Key and body returns the same job (200)."""
    job, created = service.create_job(session, principal, spec, settings, idempotency_key, storage=storage)
    if not created:
        response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(job)


@router.get("", response_model=JobList)
async def list_jobs(
    request: Request,
    principal: JobsReader,
    path: RequestPathDep,
    status: Annotated[list[JobStatus] | None, Query()] = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    """Newest first. Filter with ``status=`` (repeatable) and ``metadata[key]=value``; page with ``after``."""
    metadata = {
        key[len("metadata[") : -1]: value
        for key, value in request.query_params.items()
        if key.startswith("metadata[") and key.endswith("]")
    }
    jobs, has_more = await service.list_jobs(
        path.engine, principal.tenant_id, status=list(status or []), metadata=metadata, after=after, limit=limit
    )
    return JobList(data=jobs, has_more=has_more)


@router.get("/{job_id}", response_model=JobOut)
async def get_job(job_id: str, principal: JobsReader, path: RequestPathDep) -> JobOut:
    return await service.read_job(path.engine, principal.tenant_id, job_id)


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, principal: JobsWriter, session: SessionDep) -> JobOut:
    """Queued jobs are cancelled at once; running jobs become ``cancelling`` until the worker stops."""
    return job_out(service.cancel_job(session, principal.tenant_id, job_id))


@router.get("/{job_id}/events", response_model=EventList)
async def list_events(
    job_id: str,
    principal: JobsReader,
    path: RequestPathDep,
    after: Annotated[int, Query(ge=0, le=JSON_INT_MAX, description="the last event id seen")] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> EventList:
    events, has_more, _ = await service.list_events(path.engine, principal.tenant_id, job_id, after, limit)
    return EventList(data=events, has_more=has_more)


@router.get("/{job_id}/events/stream", response_class=StreamingResponse)
async def stream_events(
    job_id: str,
    principal: JobsReader,
    path: RequestPathDep,
    # The bounds sit on the int, so the document shows them; SkipJsonSchema: the header is omitted, never "null".
    last_event_id: Annotated[
        Annotated[int, Field(ge=0, le=JSON_INT_MAX)] | SkipJsonSchema[None], Header(alias="Last-Event-ID")
    ] = None,
    after: Annotated[int, Query(ge=0, le=JSON_INT_MAX)] = 0,
) -> StreamingResponse:
    """Server-sent events; ids are the event ids, so reconnecting with ``Last-Event-ID`` resumes exactly."""
    cursor = last_event_id if last_event_id is not None else after
    # The first page is read before the response starts, so an unknown job is a 404, not an empty stream.
    events, _, status = await service.list_events(path.engine, principal.tenant_id, job_id, cursor, 200)

    async def frames(events: list[EventOut], status: str) -> AsyncIterator[bytes]:
        since = cursor
        idle = 0
        while True:
            for event in events:
                since = event.id
                payload = json.dumps(event.model_dump(mode="json"))
                yield f"id: {event.id}\nevent: {event.type}\ndata: {payload}\n\n".encode()
            if not events and status in TERMINAL_STATUSES:
                return
            idle = 0 if events else idle + 1
            if idle and idle % 30 == 0:
                yield b": keep-alive\n\n"
            await asyncio.sleep(0.5)
            events, _, status = await service.list_events(path.engine, principal.tenant_id, job_id, since, 200)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(frames(events, status), media_type="text/event-stream", headers=headers)


@router.get("/{job_id}/artifacts", response_model=ArtifactList)
def list_artifacts(
    job_id: str, principal: JobsReader, session: SessionDep, storage: StorageDep, settings: SettingsDep
) -> ArtifactList:
    """Files of a succeeded job with size, sha256 and a short-lived download URL."""
    result = service.list_artifacts(session, principal.tenant_id, job_id, storage, settings.presign_ttl_s)
    return ArtifactList.model_validate(result)
