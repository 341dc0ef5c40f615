"""Signed URLs of the local storage backend: GET downloads and PUT uploads without credentials.

Only used in the embedded mode (S3 presigns its own URLs). The token carries key, operation and
expiry under an HMAC; nothing else about the caller is trusted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from app.deps import SettingsDep, StorageDep
from app.errors import Problem
from app.signing import InvalidToken, verify
from app.storage import LocalStorage, StorageError

router = APIRouter(prefix="/v1/storage", tags=["storage"], include_in_schema=False)


def _payload(token: str, op: str, settings: SettingsDep, storage: StorageDep) -> tuple[LocalStorage, str]:
    if not isinstance(storage, LocalStorage):
        raise Problem(404, "Not Found", "signed storage URLs are served only by the local storage backend")
    try:
        payload = verify(settings.resolved_signing_secret(), token)
    except InvalidToken as exc:
        raise Problem(403, "Forbidden", f"invalid storage URL: {exc}") from exc
    if payload.get("op") != op:
        raise Problem(403, "Forbidden", f"this URL does not allow {op.upper()}")
    return storage, str(payload["key"])


@router.get("/{token}")
def download(token: str, settings: SettingsDep, storage: StorageDep) -> FileResponse:
    local, key = _payload(token, "get", settings, storage)
    try:
        path = local.path_of(key)
    except StorageError:
        path = None
    if path is None or not path.is_file():
        raise Problem(404, "Not Found", "object does not exist")
    return FileResponse(path, filename=path.name)


@router.put("/{token}", status_code=200)
async def upload(token: str, request: Request, settings: SettingsDep, storage: StorageDep) -> Response:
    local, key = _payload(token, "put", settings, storage)
    limit = settings.max_upload_bytes

    async def body() -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise Problem(413, "Content Too Large", f"object exceeds {limit} bytes")
            yield chunk

    chunks = [c async for c in body()]  # bounded by max_upload_bytes; written atomically below
    await run_in_threadpool(local.put_stream, key, iter(chunks))
    return Response(status_code=200)
