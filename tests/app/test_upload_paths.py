"""Upload paths must be valid for every storage backend, and a completed upload's files are frozen."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.helpers import Caller, make_caller, sha256_bytes

DIGEST = "0" * 64


def _declare(client: TestClient, caller: Caller, *paths: str) -> httpx.Response:
    body = {"files": [{"path": p, "size": 1, "sha256": DIGEST} for p in paths]}
    return client.post("/v1/uploads", json=body, headers=caller.headers)


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("model\x00.safetensors", "control characters"),
        ("a\tb", "control characters"),
        ("x" * 256, "at most 255 bytes"),
        ("d/" + "é" * 128, "at most 255 bytes"),  # 256 bytes in UTF-8, 128 characters
        ("../escape", "'..'"),
        ("a/../b", "'..'"),
        ("/etc/passwd", "relative"),
        ("dir\\model.safetensors", "backslash"),
        ("a//b", "empty"),
        ("a/./b", "'.'"),
        ("a/", "empty"),
        (".hidden", "hidden"),
        ("sub/.git", "hidden"),
        ("model.safetensors.part", "reserved"),
        ("model.safetensors.parts/00001", "reserved"),
    ],
)
def test_path_no_backend_can_hold_is_422_naming_the_field(
    client: TestClient, alice: Caller, path: str, reason: str
) -> None:
    response = _declare(client, alice, "config.json", path)
    assert response.status_code == 422, response.text
    error = response.json()["errors"][0]
    assert error["field"] == "files.1.path"
    assert reason in error["message"], error


def test_file_beside_a_directory_of_the_same_name_is_422(client: TestClient, alice: Caller) -> None:
    response = _declare(client, alice, "a/b", "a")
    assert response.status_code == 422, response.text
    assert response.json()["errors"] == [{"field": "files.1.path", "message": "'a' is also a directory of another"}]
    response = _declare(client, alice, "x/y/z", "x/y", "c", "c")
    fields = [e["field"] for e in response.json()["errors"]]
    assert response.status_code == 422 and fields == ["files.1.path", "files.3.path"]


def test_portable_paths_are_accepted(client: TestClient, alice: Caller) -> None:
    response = _declare(client, alice, "config.json", "sub dir/tokenizer.json", "é" * 127, "a/b/c.safetensors")
    assert response.status_code == 201, response.text


def test_unknown_fields_are_refused(client: TestClient, alice: Caller) -> None:
    body = {"files": [{"path": "m", "size": 1, "sha256": DIGEST}], "bucket": "elsewhere"}
    response = client.post("/v1/uploads", json=body, headers=alice.headers)
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "bucket"
    body = {"files": [{"path": "m", "size": 1, "sha256": DIGEST, "mode": "0777"}]}
    response = client.post("/v1/uploads", json=body, headers=alice.headers)
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "files.0.mode"


def test_local_put_urls_refused_once_the_upload_is_complete(
    embedded_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.storage import get_storage

    caller = make_caller("frozen")
    small, big = b"verified", b"p" * 300
    body = {
        "files": [
            {"path": "m.safetensors", "size": len(small), "sha256": sha256_bytes(small)},
            {"path": "big.safetensors", "size": len(big), "sha256": sha256_bytes(big)},
        ]
    }
    from app.config import get_settings

    monkeypatch.setattr(get_settings(), "s3_multipart_threshold_bytes", 200)  # big.safetensors goes in parts
    monkeypatch.setattr(get_settings(), "s3_multipart_part_bytes", 200)
    created = embedded_client.post("/v1/uploads", json=body, headers=caller.headers).json()
    small_url = httpx.URL(created["targets"][0]["url"]).raw_path.decode()
    part_urls = [httpx.URL(part["url"]).raw_path.decode() for part in created["targets"][1]["parts"]]
    assert embedded_client.put(small_url, content=small).status_code == 200
    assert embedded_client.put(part_urls[0], content=big[:200]).status_code == 200
    assert embedded_client.put(part_urls[1], content=big[200:]).status_code == 200
    done = embedded_client.post(f"/v1/uploads/{created['id']}/complete", headers=caller.headers)
    assert done.status_code == 200, done.text

    for url in (small_url, part_urls[0]):
        replaced = embedded_client.put(url, content=b"tampered")
        assert replaced.status_code == 409, replaced.text
        assert replaced.headers["content-type"] == "application/problem+json"
        assert "complete" in replaced.json()["detail"]
    key = f"uploads/{caller.tenant_id}/{created['id']}/m.safetensors"
    assert get_storage().get_bytes(key) == small
