"""``modelpress admin create-tenant | create-key | revoke-key`` against the embedded (SQLite) database."""

from __future__ import annotations

import asyncio
import json

import pytest

from app.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object], str]:
    code = main(["admin", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else {}), err


def test_admin_commands_create_and_revoke(embedded_stack: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    from sqlalchemy import select

    from app.auth.models import ApiKey
    from app.auth.service import Principal, authenticate, hash_secret
    from app.config import get_settings
    from app.db import create_request_engine, session_scope

    def caller(clear: str) -> Principal | None:
        """Who the API would take a request with this key for."""

        async def lookup() -> Principal | None:
            engine = create_request_engine(get_settings().resolved_database_url())
            try:
                return await authenticate(engine, clear)
            finally:
                await engine.dispose()

        return asyncio.run(lookup())

    code, tenant, _ = run(capsys, "create-tenant", "acme")
    assert code == 0 and tenant["name"] == "acme" and str(tenant["id"]).startswith("ten_")

    code, key, err = run(capsys, "create-key", str(tenant["id"]), "--name", "ci", "--scopes", "jobs:read,jobs:write")
    assert code == 0 and "not shown again" in err
    clear = str(key["key"])
    assert clear.startswith("mp_live_") and key["scopes"] == ["jobs:read", "jobs:write"]
    principal = caller(clear)
    assert principal is not None and principal.tenant_id == tenant["id"]
    assert principal.scopes == {"jobs:read", "jobs:write"}
    with session_scope() as session:
        stored = session.execute(select(ApiKey).where(ApiKey.id == key["id"])).scalar_one()
        assert stored.secret_hash == hash_secret(clear) and stored.name == "ci"

    code, default_key, _ = run(capsys, "create-key", str(tenant["id"]))
    assert code == 0 and default_key["scopes"] == ["jobs:read", "jobs:write", "webhooks:manage"]

    code, revoked, _ = run(capsys, "revoke-key", str(key["id"]))
    assert code == 0 and revoked == {"id": key["id"], "revoked": True}
    assert caller(clear) is None  # at once
    assert caller(str(default_key["key"])) is not None  # only that key
    code, _, err = run(capsys, "revoke-key", str(key["id"]))
    assert code == 1 and "no active key" in err


def test_admin_create_key_refuses_unknown_scopes(
    embedded_stack: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, tenant, _ = run(capsys, "create-tenant", "acme")
    with pytest.raises(ValueError, match="unknown scopes"):
        main(["admin", "create-key", str(tenant["id"]), "--scopes", "jobs:read,root"])
