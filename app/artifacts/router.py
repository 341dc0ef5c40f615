"""Signed URLs of the local storage backend: GET downloads and PUT uploads without credentials.

Only used in the embedded mode (S3 presigns its own URLs). The token carries key, operation and
expiry under an HMAC; nothing else about the caller is trusted.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from app.db import get_sessionmaker
from app.deps import SettingsDep, StorageDep
from app.errors import Problem
from app.signing import InvalidToken, verify
from app.storage import LocalStorage, StorageError
from app.uploads.service import check_writable

router = APIRouter(prefix="/v1/storage", tags=["storage"], include_in_schema=False)


def _payload(token: str, op: str, settings: SettingsDep, storage: StorageDep) -> tuple[LocalStorage, dict[str, Any]]:
    if not isinstance(storage, LocalStorage):
        raise Problem(404, "Not Found", "signed storage URLs are served only by the local storage backend")
    try:
        payload = verify(settings.resolved_signing_secret(), token)
    except InvalidToken as exc:
        raise Problem(403, "Forbidden", f"invalid storage URL: {exc}") from exc
    if payload.get("op") != op:
        raise Problem(403, "Forbidden", f"this URL does not allow {op.upper()}")
    return storage, payload


@router.get("/{token}")
def download(token: str, settings: SettingsDep, storage: StorageDep) -> FileResponse:
    local, payload = _payload(token, "get", settings, storage)
    try:
        path = local.path_of(str(payload["key"]))
    except StorageError:
        path = None
    if path is None or not path.is_file():
        raise Problem(404, "Not Found", "object does not exist")
    return FileResponse(path, filename=path.name)


def _check_writable(key: str) -> None:
    with get_sessionmaker()() as session:
        check_writable(session, key)


@router.put("/{token}", status_code=200)
async def upload(token: str, request: Request, settings: SettingsDep, storage: StorageDep) -> Response:
    local, payload = _payload(token, "put", settings, storage)
    # A completed upload's files are frozen (verified, maybe in use): its URLs write nothing any more.
    await run_in_threadpool(_check_writable, str(payload["key"]))
    # The size declared when the URL was made (signed into it); a body longer than that is refused
    # as it arrives, so nothing past it is stored or held in memory.
    limit = min(int(payload.get("size", settings.max_upload_bytes)), settings.max_upload_bytes)
    sink = await run_in_threadpool(local.open_write, str(payload["key"]))
    try:
        async for chunk in request.stream():
            if sink.written + len(chunk) > limit:
                raise Problem(413, "Content Too Large", f"this URL accepts at most {limit} bytes")
            await run_in_threadpool(sink.write, chunk)
        # Again before the file appears: the upload may have been completed while this body streamed in.
        await run_in_threadpool(_check_writable, str(payload["key"]))
        await run_in_threadpool(sink.commit)
    finally:
        sink.discard()
    return Response(status_code=200)
