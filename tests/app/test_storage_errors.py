"""Every storage failure is a StorageError that says what happened: a missing object, an outage (retry), or
another answer — from a real S3 server, a refused connection, and S3's own error responses."""

from __future__ import annotations

from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.helpers import BUCKET, free_port


@pytest.fixture(autouse=True)
def _credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


def _storage(endpoint: str):  # type: ignore[no-untyped-def]
    from app.config import Settings
    from app.storage import S3Storage

    return S3Storage(Settings(storage_backend="s3", s3_bucket=BUCKET, s3_endpoint_url=endpoint))


def test_an_unreachable_endpoint_is_unavailable_for_every_operation(tmp_path: Path) -> None:
    from app.storage import StorageUnavailableError

    storage = _storage(f"http://127.0.0.1:{free_port()}")
    (tmp_path / "f").write_bytes(b"x")
    operations = {
        "list": lambda: storage.list("artifacts/"),
        "delete_prefix": lambda: storage.delete_prefix("artifacts/"),
        "get_file": lambda: storage.get_file("k", tmp_path / "out"),
        "get_bytes": lambda: storage.get_bytes("k"),
        "put_file": lambda: storage.put_file("k", tmp_path / "f"),
        "put_bytes": lambda: storage.put_bytes("k", b"x"),
        "size": lambda: storage.size("k"),
        "check": storage.check,
    }
    for operation in operations.values():
        with pytest.raises(StorageUnavailableError, match="storage unreachable"):
            operation()


def test_a_missing_object_is_not_found_not_an_outage(s3_endpoint: str, tmp_path: Path) -> None:
    from app.storage import ObjectNotFoundError

    storage = _storage(s3_endpoint)
    with pytest.raises(ObjectNotFoundError):
        storage.get_file("no/such/key", tmp_path / "out")
    with pytest.raises(ObjectNotFoundError):
        storage.get_bytes("no/such/key")
    assert storage.size("no/such/key") is None
    assert storage.list("no/such/") == []
    storage.delete_prefix("no/such/")  # nothing to delete is no error


def _client_error(status: int, code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (503, "SlowDown", "StorageUnavailableError"),
        (500, "InternalError", "StorageUnavailableError"),
        (400, "RequestTimeout", "StorageUnavailableError"),
        (404, "NoSuchKey", "ObjectNotFoundError"),
        (403, "AccessDenied", "StorageError"),
    ],
)
def test_s3_answers_are_classified(status: int, code: str, kind: str) -> None:
    from app.errors import unavailable_dependency
    from app.storage import _s3_error

    error = _s3_error(_client_error(status, code), "cannot read k")
    assert type(error).__name__ == kind
    # The API answers 503 for exactly the outages, 500 (a bug) or the caller's 4xx for the rest.
    assert (unavailable_dependency(error) == "storage") is (kind == "StorageUnavailableError")
