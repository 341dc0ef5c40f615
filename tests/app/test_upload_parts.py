"""GET /v1/uploads/{id}/parts: what storage holds of a pending upload, so an interrupted upload resumes."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.helpers import Caller, make_caller, sha256_bytes

MIB = 1024 * 1024


def _declare(client: TestClient, headers: dict[str, str], files: dict[str, bytes]) -> dict:  # type: ignore[type-arg]
    body = {"files": [{"path": p, "size": len(d), "sha256": sha256_bytes(d)} for p, d in files.items()]}
    created = client.post("/v1/uploads", json=body, headers=headers)
    assert created.status_code == 201, created.text
    return created.json()  # type: ignore[no-any-return]


def _put(client: TestClient, url: str, data: bytes) -> None:
    # Local-backend URLs name the API itself; S3 URLs name the S3 server.
    if "/v1/storage/" in url:
        assert client.put("/v1/storage/" + url.split("/v1/storage/", 1)[1], content=data).status_code == 200
    else:
        httpx.put(url, content=data, timeout=30).raise_for_status()


def _check_progress(client: TestClient, caller: Caller, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.config import get_settings

    settings = get_settings()
    monkeypatch.setattr(settings, "s3_multipart_threshold_bytes", 5 * MIB)
    monkeypatch.setattr(settings, "s3_multipart_part_bytes", 5 * MIB)
    big = bytes(range(256)) * (11 * MIB // 256)  # 3 parts: 5, 5, 1 MiB
    files = {"model.safetensors": big, "config.json": b"{}", "tokenizer.json": b"[]"}
    created = _declare(client, caller.headers, files)
    targets = {t["path"]: t for t in created["targets"]}
    _put(client, targets["config.json"]["url"], files["config.json"])
    part = targets["model.safetensors"]["parts"][1]  # only the second part
    _put(client, part["url"], big[5 * MIB : 10 * MIB])

    progress = client.get(f"/v1/uploads/{created['id']}/parts", headers=caller.headers)
    assert progress.status_code == 200, progress.text
    by_path = {f["path"]: f for f in progress.json()["files"]}
    assert progress.json()["status"] == "pending"
    assert by_path["config.json"]["received"] is True and by_path["config.json"]["parts"] is None
    assert by_path["tokenizer.json"]["received"] is False
    model = by_path["model.safetensors"]
    assert model["received"] is False and model["part_size"] == 5 * MIB
    assert model["parts"] == [{"part_number": 2, "size": 5 * MIB}]

    # Resume: fresh URLs, PUT only what is missing, complete.
    renewed = {
        t["path"]: t for t in client.post(f"/v1/uploads/{created['id']}/urls", headers=caller.headers).json()["targets"]
    }
    have = {p["part_number"] for p in model["parts"]}
    for target in renewed["model.safetensors"]["parts"]:
        n = target["part_number"]
        if n not in have:
            _put(client, target["url"], big[(n - 1) * 5 * MIB : n * 5 * MIB])
    _put(client, renewed["tokenizer.json"]["url"], files["tokenizer.json"])
    done = client.post(f"/v1/uploads/{created['id']}/complete", headers=caller.headers)
    assert done.status_code == 200, done.text
    after = client.get(f"/v1/uploads/{created['id']}/parts", headers=caller.headers).json()
    assert after["status"] == "complete" and all(f["received"] for f in after["files"])

    # Another tenant sees nothing.
    other = make_caller("mallory")
    assert client.get(f"/v1/uploads/{created['id']}/parts", headers=other.headers).status_code == 404


def test_progress_of_a_partial_upload_on_s3(client: TestClient, alice: Caller, monkeypatch: pytest.MonkeyPatch) -> None:
    _check_progress(client, alice, monkeypatch)


def test_progress_of_a_partial_upload_on_local_storage(
    embedded_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    _check_progress(embedded_client, make_caller("carol"), monkeypatch)
