"""A job's inputs, downloaded into the attempt's scratch directory and verified on the way.

A file that is missing, corrupt or too large is the user's to fix (:class:`InputError`); storage that
cannot be reached is not, and its :class:`~app.storage.StorageUnavailableError` goes up untouched so the
attempt is retried.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from app.config import Settings
from app.db import session_scope
from app.jobs.spec import Source
from app.storage import ObjectNotFoundError, Storage, make_storage, sha256_file, split_s3_uri
from app.storage_keys import upload_key
from app.uploads.models import Upload
from workers.failures import InputError


class InputFetcher:
    """Downloads a tenant's sources: its own uploads, or objects under an allow-listed ``s3://`` prefix."""

    def __init__(self, storage: Storage, settings: Settings, tenant_id: str) -> None:
        self.storage = storage
        self.settings = settings
        self.tenant_id = tenant_id

    def fetch(self, source: Source, dest: Path, field: str, max_bytes: int | None = None) -> list[Path]:
        """Download ``source`` into ``dest``; more than ``max_bytes`` in all is refused before anything is
        downloaded. Returns the local paths."""
        dest.mkdir(parents=True, exist_ok=True)
        if source.upload_id is not None:
            return self._fetch_upload(source.upload_id, dest, field, max_bytes)
        assert source.uri is not None
        return self._fetch_uri(source.uri, dest, field, max_bytes)

    def _fetch_upload(self, upload_id: str, dest: Path, field: str, max_bytes: int | None) -> list[Path]:
        with session_scope() as session:
            upload = session.execute(
                select(Upload).where(Upload.id == upload_id, Upload.tenant_id == self.tenant_id)
            ).scalar_one_or_none()
            if upload is None or upload.status != "complete":
                raise InputError(f"{field}: upload {upload_id} is missing or incomplete")
            files = list(upload.files)
        _check_size(sum(f["size"] for f in files), field, max_bytes)
        paths = []
        for record in files:
            path = dest / record["path"]
            try:
                self.storage.get_file(upload_key(self.tenant_id, upload_id, record["path"]), path)
            except ObjectNotFoundError as exc:
                raise InputError(f"{field}: {record['path']} of upload {upload_id} is gone from storage") from exc
            if path.stat().st_size != record["size"] or sha256_file(path) != record["sha256"]:
                raise InputError(f"{field}: {record['path']} does not match its sha256 (corrupted in storage)")
            paths.append(path)
        return paths

    def _fetch_uri(self, uri: str, dest: Path, field: str, max_bytes: int | None) -> list[Path]:
        bucket, prefix = split_s3_uri(uri)
        if bucket not in self.settings.allowed_source_buckets:
            raise InputError(f"{field}: bucket {bucket!r} is not allowed")
        remote = make_storage(self.settings, bucket)
        objects = [o for o in remote.list(prefix) if not o.key.endswith("/")]
        if not objects:
            raise InputError(f"{field}: nothing found under {uri}")
        _check_size(sum(o.size for o in objects), field, max_bytes)
        paths = []
        for obj in objects:
            relative = obj.key[len(prefix) :].lstrip("/") or obj.key.rsplit("/", 1)[-1]
            if ".." in Path(relative).parts:
                raise InputError(f"{field}: unsafe object key {obj.key!r}")
            path = dest / relative
            try:
                remote.get_file(obj.key, path)
            except ObjectNotFoundError as exc:
                raise InputError(f"{field}: {obj.key} disappeared from {uri} while it was downloaded") from exc
            if path.stat().st_size != obj.size:
                raise InputError(f"{field}: {obj.key} was truncated in transfer")
            paths.append(path)
        return paths


def _check_size(total: int, field: str, max_bytes: int | None) -> None:
    if max_bytes is not None and total > max_bytes:
        raise InputError(f"{field}: {total} bytes exceeds the limit of {max_bytes} bytes")
