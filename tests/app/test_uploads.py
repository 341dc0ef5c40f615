"""Uploads through presigned URLs (S3 server and the embedded local backend)."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.helpers import Caller, make_caller, sha256_bytes, upload_files


def test_upload_roundtrip_and_verification(client: TestClient, alice: Caller) -> None:
    upload_id = upload_files(client, alice.headers, {"a/config.json": b"{}", "b.txt": b"hello"})
    assert client.get(f"/v1/uploads/{upload_id}", headers=alice.headers).json()["total_bytes"] == 7

    data = b"payload"
    body = {"files": [{"path": "x.bin", "size": len(data), "sha256": sha256_bytes(b"other")}]}
    created = client.post("/v1/uploads", json=body, headers=alice.headers).json()
    httpx.put(created["targets"][0]["url"], content=data).raise_for_status()
    bad = client.post(f"/v1/uploads/{created['id']}/complete", headers=alice.headers)
    assert bad.status_code == 422 and "sha256" in bad.json()["detail"]

    body = {"files": [{"path": "y.bin", "size": 3, "sha256": sha256_bytes(b"abc")}]}
    missing = client.post("/v1/uploads", json=body, headers=alice.headers).json()
    response = client.post(f"/v1/uploads/{missing['id']}/complete", headers=alice.headers)
    assert response.status_code == 422 and "not uploaded" in response.json()["detail"]


def test_upload_rejects_bad_paths_and_oversize(client: TestClient, alice: Caller) -> None:
    for path in ("../etc/passwd", "/abs", "a/../../b", ".hidden"):
        body = {"files": [{"path": path, "size": 1, "sha256": "0" * 64}]}
        assert client.post("/v1/uploads", json=body, headers=alice.headers).status_code == 422, path
    huge = {"files": [{"path": "big.safetensors", "size": 10**15, "sha256": "0" * 64}]}
    response = client.post("/v1/uploads", json=huge, headers=alice.headers)
    assert response.status_code == 413 and response.headers["content-type"] == "application/problem+json"


def test_multipart_upload_for_large_files(client: TestClient, alice: Caller, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.config import get_settings

    settings = get_settings()
    monkeypatch.setattr(settings, "s3_multipart_threshold_bytes", 5 * 1024 * 1024)
    monkeypatch.setattr(settings, "s3_multipart_part_bytes", 5 * 1024 * 1024)
    data = bytes(range(256)) * (11 * 1024 * 1024 // 256)  # 11 MiB → 3 parts of ≤5 MiB
    body = {"files": [{"path": "model.safetensors", "size": len(data), "sha256": sha256_bytes(data)}]}
    created = client.post("/v1/uploads", json=body, headers=alice.headers).json()
    target = created["targets"][0]
    assert target["url"] is None and len(target["parts"]) == 3
    size = target["part_size"]
    first, *rest = target["parts"]
    httpx.put(first["url"], content=data[:size], timeout=30).raise_for_status()
    # The link was slow and the URLs ran out: fresh ones for the same parts, and more time to complete.
    renewed = client.post(f"/v1/uploads/{created['id']}/urls", headers=alice.headers)
    assert renewed.status_code == 200, renewed.text
    assert renewed.json()["expires_at"] >= created["expires_at"]
    parts = renewed.json()["targets"][0]["parts"]
    assert [p["part_number"] for p in parts] == [1, 2, 3] and len(rest) == 2
    for part in parts[1:]:
        start = (part["part_number"] - 1) * size
        httpx.put(part["url"], content=data[start : start + size], timeout=30).raise_for_status()
    done = client.post(f"/v1/uploads/{created['id']}/complete", headers=alice.headers)
    assert done.status_code == 200, done.text
    assert client.post(f"/v1/uploads/{created['id']}/urls", headers=alice.headers).status_code == 409


@pytest.fixture
def embedded_client(embedded_stack: dict[str, str]):  # type: ignore[no-untyped-def]
    from app.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


def test_local_signed_urls_expire_and_resist_tampering(embedded_client: TestClient) -> None:
    from app.config import get_settings
    from app.signing import sign

    caller = make_caller("carol")
    data = b"weights"
    body = {"files": [{"path": "m.safetensors", "size": len(data), "sha256": sha256_bytes(data)}]}
    created = embedded_client.post("/v1/uploads", json=body, headers=caller.headers).json()
    url = created["targets"][0]["url"]
    path = url.split("127.0.0.1:8000", 1)[1]
    assert embedded_client.put(path, content=data).status_code == 200
    assert embedded_client.post(f"/v1/uploads/{created['id']}/complete", headers=caller.headers).status_code == 200

    token = path.rsplit("/", 1)[1]
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    assert embedded_client.put(f"/v1/storage/{tampered}", content=b"evil").status_code == 403
    # a PUT token cannot be used to read
    assert embedded_client.get(path).status_code == 403
    secret = get_settings().resolved_signing_secret()
    key = f"uploads/{caller.tenant_id}/{created['id']}/m.safetensors"
    expired = sign(secret, {"op": "get", "key": key}, ttl_s=-1)
    assert embedded_client.get(f"/v1/storage/{expired}").json()["detail"].endswith("expired")
    fresh = sign(secret, {"op": "get", "key": key}, ttl_s=60)
    assert embedded_client.get(f"/v1/storage/{fresh}").content == data
    escape = sign(secret, {"op": "get", "key": "../../etc/passwd"}, ttl_s=60)
    assert embedded_client.get(f"/v1/storage/{escape}").status_code == 404


def test_local_put_refuses_more_than_the_declared_size(embedded_client: TestClient) -> None:
    """The declared size is signed into the URL: a longer body is refused as it streams in (nothing is
    stored, nothing buffered), so a 1-byte slot cannot take gigabytes past the tenant's byte quota."""
    from app.storage import get_storage

    caller = make_caller("dave")
    data = b"safetensors"
    body = {"files": [{"path": "m.safetensors", "size": len(data), "sha256": sha256_bytes(data)}]}
    created = embedded_client.post("/v1/uploads", json=body, headers=caller.headers).json()
    path = created["targets"][0]["url"].split("127.0.0.1:8000", 1)[1]
    too_long = embedded_client.put(path, content=data + b"x" * 1_000_000)
    assert too_long.status_code == 413 and "at most 11 bytes" in too_long.json()["detail"]
    key = f"uploads/{caller.tenant_id}/{created['id']}/m.safetensors"
    storage = get_storage()
    assert storage.size(key) is None and not list(storage.path_of(key).parent.glob("*.part"))
    assert embedded_client.put(path, content=data).status_code == 200
    assert embedded_client.post(f"/v1/uploads/{created['id']}/complete", headers=caller.headers).status_code == 200


def test_expired_uploads_are_deleted_and_their_multipart_uploads_aborted(
    client: TestClient, alice: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import timedelta

    from app.config import get_settings
    from app.db import session_scope, utcnow
    from app.storage import get_storage
    from app.storage_keys import upload_key
    from app.uploads.models import Upload
    from app.uploads.service import expire_uploads
    from workers.celery_app import celery_app

    settings = get_settings()
    monkeypatch.setattr(settings, "s3_multipart_threshold_bytes", 5 * 1024 * 1024)
    monkeypatch.setattr(settings, "s3_multipart_part_bytes", 5 * 1024 * 1024)
    big, small = b"\x01" * (6 * 1024 * 1024), b"config"
    files = [
        {"path": "model.safetensors", "size": len(big), "sha256": sha256_bytes(big)},
        {"path": "config.json", "size": len(small), "sha256": sha256_bytes(small)},
    ]
    created = client.post("/v1/uploads", json={"files": files}, headers=alice.headers).json()
    big_target, small_target = created["targets"]
    httpx.put(big_target["parts"][0]["url"], content=big[: 5 * 1024 * 1024], timeout=30).raise_for_status()
    httpx.put(small_target["url"], content=small, timeout=30).raise_for_status()
    storage = get_storage()
    prefix = upload_key(alice.tenant_id, created["id"])
    assert [o.key for o in storage.list(prefix)] == [prefix + "config.json"]
    assert storage.client.list_multipart_uploads(Bucket=storage.bucket, Prefix=prefix).get("Uploads")  # type: ignore[attr-defined]

    with session_scope() as session:
        assert expire_uploads(session, storage) == 0  # not expired yet: untouched
        session.get(Upload, created["id"]).expires_at = utcnow() - timedelta(seconds=1)  # type: ignore[union-attr]
    with session_scope() as session:
        assert expire_uploads(session, storage) == 1
    assert storage.list(prefix) == []
    assert not storage.client.list_multipart_uploads(Bucket=storage.bucket, Prefix=prefix).get("Uploads")  # type: ignore[attr-defined]
    assert client.get(f"/v1/uploads/{created['id']}", headers=alice.headers).json()["status"] == "expired"
    assert client.post(f"/v1/uploads/{created['id']}/complete", headers=alice.headers).status_code == 409
    assert celery_app.conf.beat_schedule["expire-uploads"]["options"]["queue"] == "maintenance"


def test_completion_does_not_hold_a_connection_and_loses_no_race(
    client: TestClient, alice: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verification (hashing, possibly gigabytes) runs outside any transaction, and the final switch to
    ``complete`` is guarded: an upload that expired meanwhile (its files deleted) is not completed."""
    from sqlalchemy import update

    from app.db import get_engine, session_scope
    from app.uploads import service
    from app.uploads.models import Upload

    data = b"weights"
    body = {"files": [{"path": "m.safetensors", "size": len(data), "sha256": sha256_bytes(data)}]}
    created = client.post("/v1/uploads", json=body, headers=alice.headers).json()
    httpx.put(created["targets"][0]["url"], content=data, timeout=30).raise_for_status()
    real_sha256_of = service.sha256_of
    seen: list[int] = []

    def hash_while_expiring(storage, key):  # type: ignore[no-untyped-def]
        seen.append(get_engine().pool.checkedout())  # the request's own session holds no connection now
        with session_scope() as session:
            session.execute(update(Upload).where(Upload.id == created["id"]).values(status="expired"))
        return real_sha256_of(storage, key)

    monkeypatch.setattr(service, "sha256_of", hash_while_expiring)
    done = client.post(f"/v1/uploads/{created['id']}/complete", headers=alice.headers)
    assert done.status_code == 409 and "expired while it was being verified" in done.json()["detail"]
    assert seen == [0]
    assert client.get(f"/v1/uploads/{created['id']}", headers=alice.headers).json()["status"] == "expired"
