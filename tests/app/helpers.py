from __future__ import annotations

import httpx
from fastapi.testclient import TestClient

from tests.conftest import sha256_bytes


def upload_files(client: TestClient, headers: dict[str, str], files: dict[str, bytes]) -> str:
    """Create an upload, PUT every file to its presigned URL over real HTTP, complete it; return its id."""
    body = {"files": [{"path": p, "size": len(d), "sha256": sha256_bytes(d)} for p, d in files.items()]}
    created = client.post("/v1/uploads", json=body, headers=headers)
    assert created.status_code == 201, created.text
    for target in created.json()["targets"]:
        put = httpx.put(target["url"], content=files[target["path"]], timeout=30)
        assert put.status_code == 200, put.text
    done = client.post(f"/v1/uploads/{created.json()['id']}/complete", headers=headers)
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "complete"
    return str(created.json()["id"])


def quantize_job(upload_id: str, **extra: object) -> dict[str, object]:
    return {"model": {"upload_id": upload_id}, "steps": [{"method": "quantize", "scheme": "w8a16"}], **extra}
