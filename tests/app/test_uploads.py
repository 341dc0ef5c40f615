"""Uploads through presigned URLs (S3 server and the embedded local backend)."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.app.conftest import Caller, make_caller
from tests.app.helpers import upload_files
from tests.conftest import sha256_bytes


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
    for part in target["parts"]:
        start = (part["part_number"] - 1) * size
        httpx.put(part["url"], content=data[start : start + size], timeout=30).raise_for_status()
    done = client.post(f"/v1/uploads/{created['id']}/complete", headers=alice.headers)
    assert done.status_code == 200, done.text


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
