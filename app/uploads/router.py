"""HTTP routes of /v1/uploads."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import JobsReader, JobsWriter, SessionDep, SettingsDep, StorageDep
from app.uploads import service
from app.uploads.models import Upload
from app.uploads.schemas import FileIn, FileTarget, ReceivedFile, UploadCreate, UploadOut, UploadProgress

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])


def _out(upload: Upload, targets: list[dict[str, object]] | None = None) -> UploadOut:
    return UploadOut(
        id=upload.id,
        status=upload.status,  # type: ignore[arg-type]
        total_bytes=upload.total_bytes,
        files=[FileIn(path=f["path"], size=f["size"], sha256=f["sha256"]) for f in upload.files],
        created_at=upload.created_at,
        completed_at=upload.completed_at,
        expires_at=upload.expires_at,
        targets=[FileTarget.model_validate(t) for t in targets] if targets is not None else None,
    )


@router.post("", status_code=201, response_model=UploadOut)
def create_upload(
    body: UploadCreate, principal: JobsWriter, session: SessionDep, settings: SettingsDep, storage: StorageDep
) -> UploadOut:
    """Declare files (path, size, sha256) and receive a presigned PUT URL for each (parts for large files)."""
    upload, targets = service.create_upload(session, principal, body, settings, storage)
    return _out(upload, targets)


@router.get("/{upload_id}", response_model=UploadOut)
def get_upload(upload_id: str, principal: JobsReader, session: SessionDep) -> UploadOut:
    return _out(service.get_upload(session, principal.tenant_id, upload_id))


@router.get("/{upload_id}/parts", response_model=UploadProgress)
def get_received(upload_id: str, principal: JobsReader, session: SessionDep, storage: StorageDep) -> UploadProgress:
    """What storage holds so far: each file whole or not and, for multipart files, the parts PUT. To resume
    an interrupted upload, PUT only what is missing (fresh URLs from ``POST /v1/uploads/{id}/urls``)."""
    upload, files = service.received(session, principal.tenant_id, upload_id, storage)
    return UploadProgress(
        upload_id=upload.id,
        status=upload.status,  # type: ignore[arg-type]
        files=[ReceivedFile.model_validate(f) for f in files],
    )


@router.post("/{upload_id}/urls", response_model=UploadOut)
def renew_urls(
    upload_id: str, principal: JobsWriter, session: SessionDep, settings: SettingsDep, storage: StorageDep
) -> UploadOut:
    """Fresh PUT URLs for a pending upload (the first ones last ``PRESIGN_TTL_S``), and its completion
    deadline moved out again: for large files over slow links. Parts already uploaded stay."""
    upload, targets = service.renew_urls(session, principal, upload_id, settings, storage)
    return _out(upload, targets)


@router.post("/{upload_id}/complete", response_model=UploadOut)
def complete_upload(upload_id: str, principal: JobsWriter, session: SessionDep, storage: StorageDep) -> UploadOut:
    """Verify every file's size and sha256; the upload becomes usable by jobs."""
    return _out(service.complete_upload(session, principal, upload_id, storage))
