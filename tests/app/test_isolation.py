"""Two tenants across every endpoint: another tenant's resources answer 404, lists show nothing of them.

The route table is walked, so an endpoint added later is covered or makes this test ask for its fixture.
"""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from tests.helpers import Caller, make_caller, quantize_job, sha256_bytes, upload_files

TENANT_SCOPES = ["jobs:read", "jobs:write", "webhooks:manage", "keys:manage"]
# Not tenant-owned: the operator's API and the signed storage URLs (their token is the authorisation).
EXEMPT_PREFIXES = ("/v1/admin/", "/v1/storage/")


@pytest.fixture
def tenants(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> tuple[Caller, Caller]:
    from app.config import get_settings

    # Webhook URLs are vetted (public addresses only); loopback is exempted here, and no relay runs in these tests.
    monkeypatch.setenv("MODELPRESS_URL_ALLOWLIST", '["127.0.0.1"]')
    get_settings.cache_clear()
    return make_caller("alice", TENANT_SCOPES), make_caller("bob", TENANT_SCOPES)


def _alice_world(client: TestClient, alice: Caller) -> dict[str, str]:
    """A resource of alice for every path parameter: a succeeded job with artifacts, a pending upload, a key."""
    from app.db import session_scope
    from app.jobs import lifecycle
    from app.storage import get_storage
    from app.storage_keys import artifact_prefix

    world: dict[str, str] = {}
    if any(path.startswith("/v1/webhooks") for path in client.app.openapi()["paths"]):  # type: ignore[attr-defined]
        endpoint = client.post("/v1/webhooks", json={"url": "https://127.0.0.1/alice-hook"}, headers=alice.headers)
        assert endpoint.status_code == 201, endpoint.text
        world["endpoint_id"] = endpoint.json()["id"]
    upload = upload_files(client, alice.headers, {"config.json": b"{}", "model.safetensors": b"\x00" * 64})
    job = client.post("/v1/jobs", json=quantize_job(upload, metadata={"team": "a"}), headers=alice.headers).json()
    data = b"weights"
    manifest = {"files": [{"path": "model/model.safetensors", "size": len(data), "sha256": sha256_bytes(data)}]}
    prefix = artifact_prefix(alice.tenant_id, job["id"])
    storage = get_storage()
    storage.put_bytes(prefix + "model/model.safetensors", data)
    storage.put_bytes(prefix + "manifest.json", json.dumps(manifest).encode())
    with session_scope() as session:
        assert lifecycle.claim(session, job["id"], "w1", 60)
        assert lifecycle.succeed(session, job["id"], "w1", prefix + "manifest.json", {}, {})
    pending = client.post(
        "/v1/uploads",
        json={"files": [{"path": "a.bin", "size": 1, "sha256": sha256_bytes(b"a")}]},
        headers=alice.headers,
    ).json()["id"]
    spare_key = client.post("/v1/keys", json={"name": "spare", "scopes": ["jobs:read"]}, headers=alice.headers).json()
    world.update(job_id=job["id"], upload_id=pending, key_id=spare_key["id"], completed_upload=upload)
    if "endpoint_id" in world:  # the job's events were written to alice's endpoint's outbox
        deliveries = client.get(f"/v1/webhooks/{world['endpoint_id']}/deliveries", headers=alice.headers).json()
        assert deliveries["data"], deliveries
        world["delivery_id"] = deliveries["data"][0]["id"]
    return world


def test_another_tenants_resources_answer_404_everywhere(client: TestClient, tenants: tuple[Caller, Caller]) -> None:
    alice, bob = tenants
    world = _alice_world(client, alice)
    checked = []
    # The OpenAPI document lists every public route with its methods (included routers are flattened there).
    for template, operations in client.app.openapi()["paths"].items():  # type: ignore[attr-defined]
        if "{" not in template or template.startswith(EXEMPT_PREFIXES):
            continue
        params = re.findall(r"{(\w+)}", template)
        missing = [p for p in params if p not in world]
        assert not missing, f"{template}: give alice a resource for {missing} in _alice_world"
        path = template.format(**world)
        for method in sorted(m.upper() for m in operations):
            body = None if method in ("GET", "DELETE") else {}  # a valid (empty) body where one may be read
            response = client.request(method, path, headers=bob.headers, json=body)
            assert response.status_code == 404, (method, path, response.status_code, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert alice.tenant_id not in response.text
            checked.append((method, template))
    # The same requests by alice find the resources (so the 404s above are about the tenant, not the ids).
    for method, template in sorted(checked, key=lambda c: c[0] == "DELETE"):  # deletions last
        body = None if method in ("GET", "DELETE") else {}
        response = client.request(method, template.format(**world), headers=alice.headers, json=body)
        assert response.status_code != 404, (method, template, response.text)
    expected = {
        ("GET", "/v1/jobs/{job_id}"),
        ("POST", "/v1/jobs/{job_id}/cancel"),
        ("GET", "/v1/jobs/{job_id}/events"),
        ("GET", "/v1/jobs/{job_id}/events/stream"),
        ("GET", "/v1/jobs/{job_id}/artifacts"),
        ("GET", "/v1/uploads/{upload_id}"),
        ("POST", "/v1/uploads/{upload_id}/complete"),
        ("DELETE", "/v1/keys/{key_id}"),
    }
    assert expected <= set(checked), expected - set(checked)


def test_lists_and_inputs_show_nothing_of_another_tenant(client: TestClient, tenants: tuple[Caller, Caller]) -> None:
    alice, bob = tenants
    world = _alice_world(client, alice)
    for query in ("", "?status=succeeded", "?status=queued", "?metadata[team]=a", "?after=job_~&limit=100"):
        assert client.get(f"/v1/jobs{query}", headers=bob.headers).json()["data"] == [], query
    assert [j["id"] for j in client.get("/v1/jobs", headers=alice.headers).json()["data"]] == [world["job_id"]]
    bob_keys = client.get("/v1/keys?include_revoked=true", headers=bob.headers).json()["data"]
    assert {k["tenant_id"] for k in bob_keys} == {bob.tenant_id}
    usage = client.get("/v1/limits", headers=bob.headers).json()["usage"]
    assert usage == {"running_jobs": 0, "queued_jobs": 0, "upload_bytes_last_24h": 0}
    # bob cannot build a job on alice's upload, and alice's artifacts are signed under her own prefix only
    assert client.post("/v1/jobs", json=quantize_job(world["completed_upload"]), headers=bob.headers).status_code == 422
    urls = [f["url"] for f in client.get(f"/v1/jobs/{world['job_id']}/artifacts", headers=alice.headers).json()["data"]]
    assert urls and all(f"artifacts/{alice.tenant_id}/{world['job_id']}/" in url for url in urls)
