from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient


@dataclass
class Caller:
    tenant_id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def make_caller(name: str, scopes: list[str] | None = None) -> Caller:
    from app.auth.service import create_key, create_tenant
    from app.db import session_scope

    with session_scope() as session:
        tenant = create_tenant(session, name)
        _, clear = create_key(session, tenant.id, "test", scopes)
        return Caller(tenant_id=tenant.id, key=clear)


@pytest.fixture
def client(pg_stack: dict[str, str]) -> Iterator[TestClient]:
    from app.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture
def alice(client: TestClient) -> Caller:
    return make_caller("alice")


@pytest.fixture
def bob(client: TestClient) -> Caller:
    return make_caller("bob")
