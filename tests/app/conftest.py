from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.helpers import Caller, make_caller


@pytest.fixture
def client(pg_stack: dict[str, str]) -> Iterator[TestClient]:
    from app.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture
def embedded_client(embedded_stack: dict[str, str]) -> Iterator[TestClient]:
    """The app on the embedded stack (SQLite, local storage) instead of Postgres and S3."""
    from app.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture
def alice(client: TestClient) -> Caller:
    return make_caller("alice")


@pytest.fixture
def bob(client: TestClient) -> Caller:
    return make_caller("bob")
