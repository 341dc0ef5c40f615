"""Uploads: presigned PUT URLs per file (multipart above a threshold), completion verifies sizes and sha256."""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.auth import quotas
from app.auth.service import Principal
from app.config import Settings, get_settings
from app.db import utcnow
from app.errors import Problem, conflict, not_found, unprocessable
from app.observability import metrics
from app.storage import Storage, sha256_of
from app.storage_keys import upload_key
from app.uploads.models import Upload
from app.uploads.schemas import FileIn, UploadCreate

log = logging.getLogger("modelpress.uploads")


def _check_paths(files: list[FileIn]) -> None:
    """The paths together must fit every storage backend: unique, and none both a file and a directory
    (``a`` beside ``a/b``: a directory cannot hold a file there). Each path alone is checked by the schema."""
    seen: set[str] = set()
    directories: set[str] = set()
    for f in files:
        parts = f.path.split("/")
        directories.update("/".join(parts[:n]) for n in range(1, len(parts)))
    errors = []
    for index, f in enumerate(files):
        if f.path in seen:
            errors.append({"field": f"files.{index}.path", "message": f"duplicate path {f.path!r}"})
        elif f.path in directories:
            errors.append({"field": f"files.{index}.path", "message": f"{f.path!r} is also a directory of another"})
        seen.add(f.path)
    if errors:
        raise unprocessable("; ".join(f"{e['field']}: {e['message']}" for e in errors[:5]), errors)


def create_upload(
    session: Session, principal: Principal, body: UploadCreate, settings: Settings, storage: Storage
) -> tuple[Upload, list[dict[str, object]]]:
    """Create an upload and the URLs to PUT each file to. Commits."""
    files: list[FileIn] = body.files
    if len(files) > settings.max_upload_files:
        raise unprocessable(f"at most {settings.max_upload_files} files per upload")
    _check_paths(files)
    total = sum(f.size for f in files)
    if total > settings.max_upload_bytes:
        raise Problem(
            413,
            "Content Too Large",
            f"upload of {total} bytes exceeds the limit of {settings.max_upload_bytes} bytes",
        )
    # The tenant's rolling 24-hour byte budget (429 with Retry-After); locks the tenant row until the commit.
    quotas.check_upload_quota(session, principal.tenant_id, total, settings)
    upload = Upload(
        tenant_id=principal.tenant_id,
        files=[],
        total_bytes=total,
        expires_at=utcnow() + timedelta(seconds=settings.presign_ttl_s * 4),
    )
    session.add(upload)
    session.flush()
    records: list[dict[str, object]] = []
    for f in files:
        record: dict[str, object] = {"path": f.path, "size": f.size, "sha256": f.sha256}
        if f.size > settings.s3_multipart_threshold_bytes:
            record["multipart_id"] = storage.start_multipart(upload_key(principal.tenant_id, upload.id, f.path))
            record["part_size"] = settings.s3_multipart_part_bytes
        records.append(record)
    upload.files = records
    targets = _targets(upload, settings, storage)
    session.commit()
    return upload, targets


def _targets(upload: Upload, settings: Settings, storage: Storage) -> list[dict[str, object]]:
    """Fresh presigned URLs for every file of ``upload`` (one per file, or one per part)."""
    targets: list[dict[str, object]] = []
    for record in upload.files:
        key, size = upload_key(upload.tenant_id, upload.id, record["path"]), int(record["size"])
        target: dict[str, object] = {"path": record["path"]}
        if record.get("multipart_id"):
            part = int(record.get("part_size", settings.s3_multipart_part_bytes))
            target["part_size"] = part
            target["parts"] = [
                {
                    "part_number": n,
                    "url": storage.url_for_part(
                        key, record["multipart_id"], n, settings.presign_ttl_s, size=min(part, size - (n - 1) * part)
                    ),
                }
                for n in range(1, math.ceil(size / part) + 1)
            ]
        else:
            target["url"] = storage.url_for_put(key, settings.presign_ttl_s, size=size)
        targets.append(target)
    return targets


def renew_urls(
    session: Session, principal: Principal, upload_id: str, settings: Settings, storage: Storage
) -> tuple[Upload, list[dict[str, object]]]:
    """New URLs for a pending upload whose URLs ran out (a large model over a slow link), and as long
    again to complete it. Parts already PUT stay; PUT only what is missing. Commits."""
    upload = get_upload(session, principal.tenant_id, upload_id)
    if upload.status != "pending" or upload.expires_at < utcnow():
        raise conflict(f"upload {upload_id} is {upload.status if upload.status != 'pending' else 'expired'}")
    upload.expires_at = max(upload.expires_at, utcnow() + timedelta(seconds=settings.presign_ttl_s * 4))
    targets = _targets(upload, settings, storage)
    session.commit()
    return upload, targets


def received(
    session: Session, tenant_id: str, upload_id: str, storage: Storage
) -> tuple[Upload, list[dict[str, object]]]:
    """Per file of an upload: whether storage holds it whole and, for multipart files, which parts it has.

    Read-only; a client resuming an interrupted upload PUTs only what is missing (after fresh URLs from
    :func:`renew_urls`). Parts are reported with their stored size; their content is verified at completion.
    """
    upload = get_upload(session, tenant_id, upload_id)
    # Listing parts is a storage round trip per multipart file: hold no database transaction meanwhile.
    session.commit()
    files: list[dict[str, object]] = []
    for record in upload.files:
        key = upload_key(upload.tenant_id, upload.id, record["path"])
        stored = storage.size(key) if upload.status != "expired" else None
        entry: dict[str, object] = {
            "path": record["path"],
            "size": record["size"],
            "received": stored == record["size"],
        }
        if record.get("multipart_id"):
            parts = storage.uploaded_parts(key, record["multipart_id"]) if upload.status == "pending" else {}
            entry["part_size"] = record.get("part_size")
            entry["parts"] = [{"part_number": n, "size": size} for n, size in sorted(parts.items())]
        files.append(entry)
    return upload, files


def get_upload(session: Session, tenant_id: str, upload_id: str) -> Upload:
    upload = session.execute(
        select(Upload).where(Upload.id == upload_id, Upload.tenant_id == tenant_id)
    ).scalar_one_or_none()
    if upload is None:
        raise not_found("upload", upload_id)
    return upload


EXPIRE_UPLOADS_TASK = "modelpress.expire_uploads"


def expire_uploads(session: Session, storage: Storage, now: datetime | None = None, limit: int = 100) -> int:
    """Pending uploads past their expiry become ``expired``: their multipart uploads are aborted and
    whatever was PUT is deleted, so abandoned or failed uploads do not hold storage. Returns how many."""
    now = now or utcnow()
    stale = (
        session.execute(
            select(Upload)
            .where(Upload.status == "pending", Upload.expires_at < now)
            .with_for_update(skip_locked=True)
            .limit(limit)
        )
        .scalars()
        .all()
    )
    for upload in stale:
        for record in upload.files:
            if record.get("multipart_id"):
                key = upload_key(upload.tenant_id, upload.id, record["path"])
                try:
                    storage.abort_multipart(key, record["multipart_id"])
                except Exception:  # already completed or aborted: nothing is left to abort
                    log.info("upload %s: no multipart upload to abort for %s", upload.id, key, exc_info=True)
        storage.delete_prefix(upload_key(upload.tenant_id, upload.id))
        upload.status = "expired"
    session.commit()
    if stale and get_settings().metrics_enabled:
        metrics.UPLOADS_EXPIRED.inc(len(stale))
    return len(stale)


def complete_upload(session: Session, principal: Principal, upload_id: str, storage: Storage) -> Upload:
    """Assemble multipart files, then verify every size and sha256 against what was declared. Commits."""
    upload = get_upload(session, principal.tenant_id, upload_id)
    if upload.status == "complete":
        return upload
    if upload.expires_at < utcnow():
        raise conflict("this upload expired before it was completed; create a new one")
    # End the read transaction: hashing gigabytes takes minutes and must not hold a database connection.
    session.commit()
    started = time.monotonic()
    problems = []
    for record in upload.files:
        key = upload_key(upload.tenant_id, upload.id, record["path"])
        if record.get("multipart_id") and storage.size(key) is None:
            try:
                storage.finish_multipart(key, record["multipart_id"])
            except Exception:
                log.warning("upload %s: finishing the multipart upload of %s failed", upload.id, key, exc_info=True)
                problems.append({"field": record["path"], "message": "multipart upload incomplete: parts are missing"})
                continue
        size = storage.size(key)
        if size is None:
            problems.append({"field": record["path"], "message": "file was not uploaded"})
        elif size != record["size"]:
            problems.append({"field": record["path"], "message": f"size is {size}, declared {record['size']}"})
        elif sha256_of(storage, key) != record["sha256"]:
            problems.append({"field": record["path"], "message": "sha256 does not match the declared digest"})
    observe = get_settings().metrics_enabled
    if observe:
        metrics.UPLOAD_VERIFY.labels("invalid" if problems else "ok").observe(time.monotonic() - started)
    if problems:
        raise unprocessable(
            "upload verification failed: " + "; ".join(p["field"] + ": " + p["message"] for p in problems), problems
        )
    # Guarded: the upload may have expired (and been deleted) or been completed by a twin meanwhile.
    session.execute(
        update(Upload)
        .where(Upload.id == upload.id, Upload.status == "pending")
        .values(status="complete", completed_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    session.refresh(upload)
    if upload.status != "complete":
        raise conflict("this upload expired while it was being verified; create a new one")
    if observe:
        metrics.UPLOAD_BYTES.inc(sum(int(record["size"]) for record in upload.files))
    return upload


def check_writable(session: Session, key: str) -> None:
    """A signed PUT URL may write only into a pending, unexpired upload: once an upload is complete its
    files were verified and jobs may read them, so they are frozen (409); expired ones are being deleted.

    The local backend's URLs are API routes that call this; S3's presigned URLs cannot be revoked and stay
    valid until they expire (see ``S3Storage.url_for_put``): there the worker's sha256 check at input
    fetch is what stops a replaced file."""
    parts = key.split("/", 3)
    if len(parts) < 4 or parts[0] != "uploads":
        raise Problem(403, "Forbidden", "this URL does not write into an upload")
    row = session.execute(
        select(Upload.status, Upload.expires_at).where(Upload.id == parts[2], Upload.tenant_id == parts[1])
    ).one_or_none()
    if row is None:
        raise not_found("upload", parts[2])
    status, expires_at = row
    if status == "pending" and expires_at < utcnow():
        status = "expired"
    if status != "pending":
        raise conflict(f"upload {parts[2]} is {status}; its files can no longer be written")


def require_complete(session: Session, tenant_id: str, upload_id: str, field: str) -> Upload:
    upload = session.execute(
        select(Upload).where(Upload.id == upload_id, Upload.tenant_id == tenant_id)
    ).scalar_one_or_none()
    if upload is None:
        raise unprocessable(
            f"{field}: upload {upload_id!r} does not exist", [{"field": field, "message": "unknown upload"}]
        )
    if upload.status != "complete":
        raise unprocessable(
            f"{field}: upload {upload_id!r} is not complete", [{"field": field, "message": "upload not complete"}]
        )
    return upload
