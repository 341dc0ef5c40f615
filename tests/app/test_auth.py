"""API keys and tenants: 401/403 problems, the admin API, self-service keys, revocation, secrets at rest, bootstrap."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from tests.helpers import Caller, make_caller

PROBLEM = "application/problem+json"
TENANT_SCOPES = ["jobs:read", "jobs:write", "webhooks:manage", "keys:manage"]


@pytest.fixture
def admin(client: TestClient) -> Caller:
    return make_caller("operators", ["admin"])


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_missing_or_bad_key_is_401_problem(client: TestClient, alice: Caller) -> None:
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}, bearer("mp_live_nope")):
        response = client.get("/v1/jobs", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["content-type"] == PROBLEM
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["status"] == 401
    assert client.get("/v1/jobs", headers=alice.headers).status_code == 200


def test_missing_scope_is_403_problem(client: TestClient) -> None:
    reader = make_caller("readers", ["jobs:read"])
    assert client.get("/v1/jobs", headers=reader.headers).status_code == 200
    for method, path in (("POST", "/v1/jobs"), ("GET", "/v1/keys"), ("GET", "/v1/admin/tenants")):
        response = client.request(method, path, headers=reader.headers, json={})
        assert response.status_code == 403, path
        assert response.headers["content-type"] == PROBLEM
        assert "lacks the" in response.json()["detail"]


def test_admin_api_manages_tenants_quotas_and_keys(client: TestClient, admin: Caller, alice: Caller) -> None:
    created = client.post(
        "/v1/admin/tenants", json={"name": "acme", "max_running_jobs": 3, "priority": 8}, headers=admin.headers
    )
    assert created.status_code == 201, created.text
    tenant = created.json()
    assert tenant["overrides"]["max_running_jobs"] == 3 and tenant["limits"]["max_running_jobs"] == 3
    assert tenant["overrides"]["max_queued_jobs"] is None and tenant["limits"]["max_queued_jobs"] == 100
    assert tenant["limits"]["priority"] == 8
    duplicate = client.post("/v1/admin/tenants", json={"name": "acme"}, headers=admin.headers)
    assert duplicate.status_code == 409 and duplicate.headers["content-type"] == PROBLEM
    bad = client.post("/v1/admin/tenants", json={"name": "x", "priority": 10}, headers=admin.headers)
    assert bad.status_code == 422

    # PATCH changes only the fields sent; null returns a quota to the operator default.
    patched = client.patch(
        f"/v1/admin/tenants/{tenant['id']}",
        json={"max_running_jobs": None, "max_queued_jobs": 7},
        headers=admin.headers,
    ).json()
    assert patched["overrides"]["max_running_jobs"] is None and patched["limits"]["max_running_jobs"] == 2
    assert patched["overrides"]["max_queued_jobs"] == 7 and patched["overrides"]["priority"] == 8
    assert client.get(f"/v1/admin/tenants/{tenant['id']}", headers=admin.headers).json() == patched
    assert client.patch("/v1/admin/tenants/ten_missing", json={}, headers=admin.headers).status_code == 404

    page = client.get("/v1/admin/tenants?limit=2", headers=admin.headers).json()
    assert len(page["data"]) == 2 and page["has_more"] is True
    rest = client.get(f"/v1/admin/tenants?after={page['data'][-1]['id']}", headers=admin.headers).json()
    names = [t["name"] for t in page["data"] + rest["data"]]
    assert sorted(names) == ["acme", "alice", "operators"] and rest["has_more"] is False

    key = client.post(
        f"/v1/admin/tenants/{tenant['id']}/keys", json={"name": "ci", "scopes": ["jobs:read"]}, headers=admin.headers
    )
    assert key.status_code == 201, key.text
    clear = key.json()["key"]
    assert clear.startswith("mp_live_") and len(clear) > 40
    assert key.json()["prefix"] == clear[:16] and key.json()["tenant_id"] == tenant["id"]
    assert client.get("/v1/jobs", headers=bearer(clear)).status_code == 200
    assert client.post("/v1/admin/tenants/ten_missing/keys", json={}, headers=admin.headers).status_code == 404

    listed = client.get(f"/v1/admin/tenants/{tenant['id']}/keys", headers=admin.headers)
    assert [k["id"] for k in listed.json()["data"]] == [key.json()["id"]]
    assert clear not in listed.text and "key" not in listed.json()["data"][0]
    assert listed.json()["data"][0]["last_used_at"] is not None

    # Revocation is effective on the very next request.
    assert client.delete(f"/v1/admin/keys/{key.json()['id']}", headers=admin.headers).status_code == 204
    assert client.get("/v1/jobs", headers=bearer(clear)).status_code == 401
    assert client.delete(f"/v1/admin/keys/{key.json()['id']}", headers=admin.headers).status_code == 404

    # Admin endpoints are for admin keys only.
    assert client.get("/v1/admin/tenants", headers=alice.headers).status_code == 403


def test_self_service_keys(client: TestClient) -> None:
    owner = make_caller("owner", TENANT_SCOPES)
    other = make_caller("other", TENANT_SCOPES)

    created = client.post("/v1/keys", json={"name": "reader", "scopes": ["jobs:read"]}, headers=owner.headers)
    assert created.status_code == 201, created.text
    reader = created.json()
    assert reader["tenant_id"] == owner.tenant_id and reader["scopes"] == ["jobs:read"]
    assert client.get("/v1/jobs", headers=bearer(reader["key"])).status_code == 200

    # Never more than the calling key has: no admin, no scope it lacks.
    escalate = client.post("/v1/keys", json={"scopes": ["admin"]}, headers=owner.headers)
    assert escalate.status_code == 403 and "admin" in escalate.json()["detail"]
    manager = client.post("/v1/keys", json={"scopes": ["keys:manage"]}, headers=owner.headers).json()
    widen = client.post("/v1/keys", json={"scopes": ["jobs:write"]}, headers=bearer(manager["key"]))
    assert widen.status_code == 403
    assert client.post("/v1/keys", json={"scopes": ["nope"]}, headers=owner.headers).status_code == 422
    # Keys without keys:manage cannot manage keys.
    assert client.get("/v1/keys", headers=bearer(reader["key"])).status_code == 403

    listed = client.get("/v1/keys", headers=owner.headers)
    assert {k["id"] for k in listed.json()["data"]} >= {reader["id"], manager["id"]}
    assert all(k["tenant_id"] == owner.tenant_id and "key" not in k for k in listed.json()["data"])
    assert reader["key"] not in listed.text and reader["prefix"] in listed.text

    # Another tenant's key is not found; one's own is revoked at once.
    assert client.delete(f"/v1/keys/{reader['id']}", headers=other.headers).status_code == 404
    assert client.get("/v1/jobs", headers=bearer(reader["key"])).status_code == 200
    assert client.delete(f"/v1/keys/{reader['id']}", headers=owner.headers).status_code == 204
    assert client.get("/v1/jobs", headers=bearer(reader["key"])).status_code == 401
    assert client.delete(f"/v1/keys/{reader['id']}", headers=owner.headers).status_code == 404
    active = {k["id"] for k in client.get("/v1/keys", headers=owner.headers).json()["data"]}
    revoked = client.get("/v1/keys?include_revoked=true", headers=owner.headers).json()["data"]
    assert reader["id"] not in active
    assert [k["revoked_at"] is not None for k in revoked if k["id"] == reader["id"]] == [True]


def test_keys_are_never_stored_or_logged_in_clear(
    client: TestClient, admin: Caller, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy import select

    import app.models  # noqa: F401 - every table, including ones added later
    from app.auth.service import hash_secret
    from app.db import Base, session_scope

    caplog.set_level(logging.DEBUG)
    tenant = client.post("/v1/admin/tenants", json={"name": "secretive"}, headers=admin.headers).json()
    clear = client.post(f"/v1/admin/tenants/{tenant['id']}/keys", json={}, headers=admin.headers).json()["key"]
    own = client.post("/v1/keys", json={"scopes": ["jobs:read"]}, headers=admin.headers).json()["key"]
    secret_parts = [clear, clear[len("mp_live_") :], own, own[len("mp_live_") :]]
    for key in (clear, own):
        assert client.get("/v1/jobs", headers=bearer(key)).status_code == 200
        assert client.get("/v1/limits", headers=bearer(key)).status_code == 200
    # A near miss is refused without echoing what was sent.
    assert clear[:-1] not in client.get("/v1/jobs", headers=bearer(clear[:-1] + "x")).text

    seen_hash = False
    with session_scope() as session:
        for table in Base.metadata.sorted_tables:
            for row in session.execute(select(table)).all():
                text = " ".join(str(value) for value in row)
                for part in secret_parts:
                    assert part not in text, f"clear key found in table {table.name}"
                seen_hash = seen_hash or hash_secret(clear) in text
    assert seen_hash, "the key's hash should be what is stored"
    assert caplog.records, "logging was captured"
    for part in secret_parts:
        assert part not in caplog.text


def test_bootstrap_key_dev_only(pg_stack: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from app.config import get_settings
    from app.main import create_app

    monkeypatch.setenv("MODELPRESS_BOOTSTRAP_API_KEY", "mp_dev_test_bootstrap")
    get_settings.cache_clear()
    for _ in range(2):  # idempotent across restarts
        with TestClient(create_app()) as client:
            assert client.get("/v1/jobs", headers=bearer("mp_dev_test_bootstrap")).status_code == 200
            keys = client.get("/v1/keys", headers=bearer("mp_dev_test_bootstrap")).json()["data"]
            assert [k["name"] for k in keys] == ["bootstrap"]

    monkeypatch.setenv("MODELPRESS_ENVIRONMENT", "production")
    get_settings.cache_clear()
    with pytest.raises(RuntimeError, match="must not be set in production"), TestClient(create_app()):
        pass
