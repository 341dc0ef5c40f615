"""Unbounded input is refused before any work: request bodies over the limit (413) and integers past what
the database holds (422 naming the field, never a 500 from the driver)."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.helpers import Caller, make_caller, quantize_job, sha256_bytes, upload_files

TOO_BIG = 2**63
JSON_INT_MAX = 2**53 - 1


def test_request_body_over_the_limit_is_413(client: TestClient, alice: Caller) -> None:
    from app.config import get_settings

    limit = get_settings().max_request_body_bytes
    spec = quantize_job("upl_x", metadata={"pad": "x" * 500})
    spec["padding"] = "y" * limit  # unknown and huge: refused for its size before it is even parsed
    response = client.post("/v1/jobs", json=spec, headers=alice.headers)
    assert response.status_code == 413, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert str(limit) in response.json()["detail"]


def test_chunked_body_over_the_limit_is_413(client: TestClient, alice: Caller) -> None:
    """Without Content-Length the body is counted as it arrives."""
    from app.config import get_settings

    limit = get_settings().max_request_body_bytes

    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    response = client.post(
        "/v1/webhooks", content=chunks(), headers={**alice.headers, "Content-Type": "application/json"}
    )
    assert response.status_code == 413, response.text


def test_body_under_the_limit_still_works(client: TestClient, alice: Caller) -> None:
    upload_id = upload_files(client, alice.headers, {"config.json": b"{}"})
    spec = quantize_job(upload_id, metadata={"note": "x" * 500})
    assert client.post("/v1/jobs", json=spec, headers=alice.headers).status_code == 201


def test_local_storage_put_streams_past_the_json_limit(
    embedded_stack: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signed PUT routes of the local backend take model files far larger than any JSON body."""
    from app.config import get_settings
    from app.main import create_app

    monkeypatch.setenv("MODELPRESS_MAX_REQUEST_BODY_BYTES", "4096")
    get_settings.cache_clear()
    with TestClient(create_app()) as embedded:
        caller = make_caller("big-files")
        data = b"w" * 100_000
        body = {"files": [{"path": "m.safetensors", "size": len(data), "sha256": sha256_bytes(data)}]}
        created = embedded.post("/v1/uploads", json=body, headers=caller.headers).json()
        path = httpx.URL(created["targets"][0]["url"]).raw_path.decode()
        assert embedded.put(path, content=data).status_code == 200
        done = embedded.post(f"/v1/uploads/{created['id']}/complete", headers=caller.headers)
        assert done.status_code == 200, done.text
        # ...while a JSON body of the same size is refused.
        assert embedded.post("/v1/uploads", content=data, headers=caller.headers).status_code == 413


def test_event_cursor_past_int64_is_422(client: TestClient, alice: Caller) -> None:
    upload_id = upload_files(client, alice.headers, {"config.json": b"{}"})
    job_id = client.post("/v1/jobs", json=quantize_job(upload_id), headers=alice.headers).json()["id"]
    events = client.get(f"/v1/jobs/{job_id}/events", params={"after": TOO_BIG}, headers=alice.headers)
    assert events.status_code == 422, events.text
    assert events.json()["errors"][0]["field"] == "query.after"
    largest = client.get(f"/v1/jobs/{job_id}/events", params={"after": JSON_INT_MAX}, headers=alice.headers)
    assert largest.status_code == 200 and largest.json()["data"] == []
    stream = client.get(f"/v1/jobs/{job_id}/events/stream", headers={**alice.headers, "Last-Event-ID": str(TOO_BIG)})
    assert stream.status_code == 422, stream.text
    assert stream.json()["errors"][0]["field"].lower().startswith("header.last-event-id")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_upload_bytes", TOO_BIG),  # BIGINT, bounded by what JSON parsers read exactly (2^53 - 1)
        ("max_upload_bytes", JSON_INT_MAX + 1),
        ("max_running_jobs", 2**31),  # INTEGER columns
        ("max_queued_jobs", 2**31),
        ("rate_limit_per_minute", 2**31),
    ],
)
def test_tenant_quota_past_the_column_is_422(client: TestClient, field: str, value: int) -> None:
    admin = make_caller("operator", ["admin"])
    tenant = client.post("/v1/admin/tenants", json={"name": f"t-{field}-{value}"}, headers=admin.headers)
    assert tenant.status_code == 201, tenant.text
    patched = client.patch(f"/v1/admin/tenants/{tenant.json()['id']}", json={field: value}, headers=admin.headers)
    assert patched.status_code == 422, patched.text
    assert patched.json()["errors"][0]["field"] == field
    created = client.post("/v1/admin/tenants", json={"name": f"u-{field}-{value}", field: value}, headers=admin.headers)
    assert created.status_code == 422, created.text
    # The largest value the schema allows is accepted.
    ok = JSON_INT_MAX if field == "max_upload_bytes" else value - 1
    largest = client.patch(f"/v1/admin/tenants/{tenant.json()['id']}", json={field: ok}, headers=admin.headers)
    assert largest.status_code == 200, largest.text
    assert largest.json()["overrides"][field] == ok
