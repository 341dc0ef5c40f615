"""Object storage: one small interface, an S3 implementation (boto3) and a local-directory one.

Keys are ``/``-separated paths. Both backends mint URLs a client can PUT to and GET from without
credentials: S3 presigns them; the local backend returns signed, expiring API URLs that
``app/artifacts/router.py`` serves. Integrity is checked by us (sha256), never assumed.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from app.config import Settings, get_settings
from app.signing import sign

CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class StorageError(Exception):
    """A storage operation failed. The subclasses say why, where the caller acts on the difference."""


class ObjectNotFoundError(StorageError):
    """The object does not exist (S3 ``404``/``NoSuchKey``, a missing file): an answer, not an outage."""


class StorageUnavailableError(StorageError):
    """The storage service could not be reached, timed out, or answered with a server error (5xx, throttling):
    transient, so the operation is worth retrying later."""


# S3 error codes that mean "no such object" and "busy, retry": every other error code is a permanent answer.
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchUpload"})
_RETRYABLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable", "InternalError"}
)


def _s3_error(exc: BaseException, what: str) -> StorageError:
    """The :class:`StorageError` for a botocore/boto3 exception raised while doing ``what``.

    boto3's transfer manager re-raises transport errors as its own exceptions, so the chain
    (``__cause__``/``__context__``) is searched for the botocore error that says what happened.
    """
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ClientError):
            error = current.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(current.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in _NOT_FOUND_CODES or status == 404:
                return ObjectNotFoundError(f"{what}: no such object")
            if status >= 500 or code in _RETRYABLE_CODES:
                return StorageUnavailableError(f"{what}: the storage service answered {code or status}")
            return StorageError(f"{what}: {code or status} {error.get('Message', '')}".rstrip())
        if isinstance(current, BotoConnectionError | HTTPClientError):
            return StorageUnavailableError(f"{what}: storage unreachable ({type(current).__name__})")
        current = current.__cause__ or current.__context__
    return StorageError(f"{what}: {type(exc).__name__}: {exc}")


@contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    """Raise every botocore/boto3 failure inside the block as a :class:`StorageError` (classified)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, BotoCoreError | ClientError | Boto3Error):
            raise _s3_error(exc, what) from exc
        raise


class Storage(Protocol):
    """What the service needs from object storage."""

    def put_file(self, key: str, path: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_file(self, key: str, dest: Path) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def size(self, key: str) -> int | None: ...
    def iter_chunks(self, key: str) -> Iterator[bytes]: ...
    def list(self, prefix: str) -> list[ObjectInfo]: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def url_for_get(self, key: str, ttl_s: int, filename: str | None = None) -> str: ...
    def url_for_put(self, key: str, ttl_s: int, size: int | None = None) -> str: ...
    def start_multipart(self, key: str) -> str: ...
    def url_for_part(
        self, key: str, multipart_id: str, part_number: int, ttl_s: int, size: int | None = None
    ) -> str: ...
    def finish_multipart(self, key: str, multipart_id: str) -> None: ...
    def abort_multipart(self, key: str, multipart_id: str) -> None: ...
    def uploaded_parts(self, key: str, multipart_id: str) -> dict[int, int]: ...
    def check(self) -> None: ...


def sha256_of(storage: Storage, key: str) -> str:
    digest = hashlib.sha256()
    for chunk in storage.iter_chunks(key):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b")``."""
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix


class PartialFile:
    """A file written under a temporary name and renamed into place by :meth:`commit` (atomic: readers
    never see half a file); :meth:`discard` removes whatever was not committed."""

    def __init__(self, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.dest = dest
        # A name of its own: two PUTs of one key at once must not write into the same temporary file.
        self.tmp = dest.with_name(f"{dest.name}.{secrets.token_hex(6)}.part")
        self.handle = self.tmp.open("wb")
        self.written = 0

    def write(self, chunk: bytes) -> None:
        self.handle.write(chunk)
        self.written += len(chunk)

    def commit(self) -> None:
        self.handle.close()
        os.replace(self.tmp, self.dest)

    def discard(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


class LocalStorage:
    """Objects as files under a root directory; URLs are signed API routes."""

    def __init__(self, root: Path, settings: Settings) -> None:
        self.root = root
        self.settings = settings
        root.mkdir(parents=True, exist_ok=True)

    def path_of(self, key: str) -> Path:
        """The file behind ``key``; raises :class:`StorageError` for keys escaping the root."""
        return self._path(key)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise StorageError(f"key escapes the storage root: {key!r}")
        return path

    def put_file(self, key: str, path: Path) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)  # atomic: readers never see half a file

    def put_bytes(self, key: str, data: bytes) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, dest)

    def open_write(self, key: str) -> PartialFile:
        """A file for ``key`` written piece by piece, visible only once committed."""
        return PartialFile(self._path(key))

    def put_stream(self, key: str, chunks: Iterator[bytes]) -> int:
        sink = self.open_write(key)
        try:
            for chunk in chunks:
                sink.write(chunk)
            sink.commit()
        finally:
            sink.discard()
        return sink.written

    def get_file(self, key: str, dest: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFoundError(f"no such object: {key}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)

    def get_bytes(self, key: str) -> bytes:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFoundError(f"no such object: {key}")
        return source.read_bytes()

    def size(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if path.is_file() else None

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        with self._path(key).open("rb") as handle:
            while chunk := handle.read(CHUNK):
                yield chunk

    def list(self, prefix: str) -> list[ObjectInfo]:
        base = self._path(prefix) if prefix else self.root
        directory = base if base.is_dir() else base.parent
        found = []
        if directory.exists():
            for path in sorted(directory.rglob("*")):
                if path.is_file() and not path.name.endswith(".part"):
                    key = path.relative_to(self.root.resolve()).as_posix()
                    if key.startswith(prefix):
                        found.append(ObjectInfo(key=key, size=path.stat().st_size))
        return found

    def delete_prefix(self, prefix: str) -> None:
        for info in self.list(prefix):
            self._path(info.key).unlink(missing_ok=True)

    def _url(self, op: str, key: str, ttl_s: int, **extra: Any) -> str:
        token = sign(self.settings.resolved_signing_secret(), {"op": op, "key": key, **extra}, ttl_s)
        return f"{self.settings.public_base_url.rstrip('/')}/v1/storage/{quote(token)}"

    def url_for_get(self, key: str, ttl_s: int, filename: str | None = None) -> str:
        return self._url("get", key, ttl_s)

    def url_for_put(self, key: str, ttl_s: int, size: int | None = None) -> str:
        # The declared size travels in the signed token: the PUT route refuses a longer body.
        return self._url("put", key, ttl_s, **({"size": size} if size is not None else {}))

    def start_multipart(self, key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def url_for_part(self, key: str, multipart_id: str, part_number: int, ttl_s: int, size: int | None = None) -> str:
        return self.url_for_put(f"{key}.parts/{part_number:05d}", ttl_s, size)

    def finish_multipart(self, key: str, multipart_id: str) -> None:
        parts_dir = self._path(f"{key}.parts")
        parts = sorted(parts_dir.glob("[0-9]*")) if parts_dir.is_dir() else []
        if not parts:
            raise StorageError(f"no parts uploaded for {key}")

        def chunks() -> Iterator[bytes]:
            for part in parts:
                with part.open("rb") as handle:
                    while chunk := handle.read(CHUNK):
                        yield chunk

        self.put_stream(key, chunks())
        shutil.rmtree(parts_dir, ignore_errors=True)

    def abort_multipart(self, key: str, multipart_id: str) -> None:
        shutil.rmtree(self._path(f"{key}.parts"), ignore_errors=True)

    def uploaded_parts(self, key: str, multipart_id: str) -> dict[int, int]:
        """Part number → size of the parts of ``key`` PUT so far (a PUT becomes a part only once whole)."""
        parts_dir = self._path(f"{key}.parts")
        if not parts_dir.is_dir():
            return {}
        # Only committed parts: a PUT in flight writes to '<n>.<random>.part' first.
        return {int(p.name): p.stat().st_size for p in parts_dir.iterdir() if p.name.isdigit() and p.is_file()}

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"storage directory not writable: {self.root}")


class S3Storage:
    """Objects in one S3-compatible bucket (AWS, MinIO, moto)."""

    def __init__(self, settings: Settings, bucket: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.settings = settings
        self.bucket = bucket or settings.s3_bucket
        # A short connect timeout: an unreachable endpoint must read as an outage in seconds, not minutes
        # (botocore's default is 60 s per try); reads keep the default, a large object streams slowly.
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"mode": "standard"},
            connect_timeout=5,
        )
        self.client = boto3.client(
            "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region, config=config
        )
        # Presigned URLs must name an endpoint the client can reach (e.g. MinIO's public address).
        self.presign_client = (
            boto3.client(
                "s3",
                endpoint_url=settings.s3_public_endpoint_url,
                region_name=settings.s3_region,
                config=config,
            )
            if settings.s3_public_endpoint_url
            else self.client
        )

    def put_file(self, key: str, path: Path) -> None:
        with _s3_errors(f"cannot upload {key}"):
            self.client.upload_file(str(path), self.bucket, key)

    def put_bytes(self, key: str, data: bytes) -> None:
        with _s3_errors(f"cannot write {key}"):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def get_file(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _s3_errors(f"cannot download s3://{self.bucket}/{key}"):
            self.client.download_file(self.bucket, key, str(dest))

    def get_bytes(self, key: str) -> bytes:
        with _s3_errors(f"cannot read {key}"):
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()  # type: ignore[no-any-return]

    def size(self, key: str) -> int | None:
        # Only "no such object" is an answer; an unreachable endpoint must not read as "not uploaded".
        try:
            with _s3_errors(f"cannot stat {key}"):
                return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except ObjectNotFoundError:
            return None

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        with _s3_errors(f"cannot read {key}"):
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            yield from body.iter_chunks(CHUNK)

    def list(self, prefix: str) -> list[ObjectInfo]:
        found = []
        with _s3_errors(f"cannot list {prefix!r}"):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    found.append(ObjectInfo(key=item["Key"], size=int(item["Size"])))
        return found

    def delete_prefix(self, prefix: str) -> None:
        keys = [{"Key": info.key} for info in self.list(prefix)]
        with _s3_errors(f"cannot delete under {prefix!r}"):
            for start in range(0, len(keys), 1000):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[start : start + 1000]})

    def url_for_get(self, key: str, ttl_s: int, filename: str | None = None) -> str:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        return str(self.presign_client.generate_presigned_url("get_object", Params=params, ExpiresIn=ttl_s))

    def url_for_put(self, key: str, ttl_s: int, size: int | None = None) -> str:
        # A presigned PUT cannot bound the body's length (a presigned POST policy could); the size and
        # sha256 are verified when the upload is completed, and failed uploads expire and are deleted.
        # Nor can it be revoked: until it expires (presign_ttl_s) it can replace a file of an upload that
        # is already complete. The worker verifies every input's sha256 again when it fetches it
        # (workers/runner.py), so a replaced file fails the job as invalid input, never compressed.
        return str(
            self.presign_client.generate_presigned_url(
                "put_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=ttl_s
            )
        )

    def start_multipart(self, key: str) -> str:
        with _s3_errors(f"cannot start a multipart upload of {key}"):
            return str(self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"])

    def url_for_part(self, key: str, multipart_id: str, part_number: int, ttl_s: int, size: int | None = None) -> str:
        return str(
            self.presign_client.generate_presigned_url(
                "upload_part",
                Params={"Bucket": self.bucket, "Key": key, "UploadId": multipart_id, "PartNumber": part_number},
                ExpiresIn=ttl_s,
            )
        )

    def finish_multipart(self, key: str, multipart_id: str) -> None:
        # The server lists the parts itself, so clients need not echo ETags back.
        # list_parts returns at most 1000 parts a page; a 10,000-part upload needs the paginator.
        with _s3_errors(f"cannot finish the multipart upload of {key}"):
            pages = self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=key, UploadId=multipart_id)
            parts = [part for page in pages for part in page.get("Parts", [])]
            if not parts:
                raise StorageError(f"no parts uploaded for {key}")
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=multipart_id,
                MultipartUpload={"Parts": [{"ETag": p["ETag"], "PartNumber": p["PartNumber"]} for p in parts]},
            )

    def abort_multipart(self, key: str, multipart_id: str) -> None:
        with _s3_errors(f"cannot abort the multipart upload of {key}"):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=multipart_id)

    def uploaded_parts(self, key: str, multipart_id: str) -> dict[int, int]:
        """Part number → size of the parts of ``key`` PUT so far; empty once the upload was finished or aborted."""
        pages = self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=key, UploadId=multipart_id)
        try:
            with _s3_errors(f"cannot list the parts of {key}"):
                return {int(p["PartNumber"]): int(p["Size"]) for page in pages for p in page.get("Parts", [])}
        except ObjectNotFoundError:  # NoSuchUpload
            return {}

    def check(self) -> None:
        with _s3_errors(f"bucket {self.bucket!r} not reachable"):
            self.client.head_bucket(Bucket=self.bucket)


def make_storage(settings: Settings, bucket: str | None = None) -> Storage:
    if settings.storage_backend == "s3":
        return S3Storage(settings, bucket)
    if bucket is not None:
        raise StorageError("s3:// sources need the s3 storage backend")
    return LocalStorage(settings.resolved_storage_dir(), settings)


@lru_cache
def get_storage() -> Storage:
    return make_storage(get_settings())
