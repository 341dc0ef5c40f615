"""The client cannot fall behind the API: every operation in /openapi.json is one the SDK calls (or is
deliberately left out), and every response model matches the server's schema field for field."""

from __future__ import annotations

from typing import Any

import pytest

import modelpress._client  # noqa: F401 - registers every operation the SDK calls
from modelpress._http import registered_operations
from modelpress._models import SCHEMAS

# Operations the SDK leaves out on purpose, and why.
OMITTED = {
    ("GET", "/healthz"): "an operator's liveness probe, not a client concern",
    ("GET", "/readyz"): "an operator's readiness probe, not a client concern",
}


@pytest.fixture(scope="module")
def openapi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    mp = pytest.MonkeyPatch()
    mp.setenv("MODELPRESS_DATA_DIR", str(tmp_path_factory.mktemp("var")))
    from app.config import get_settings
    from app.main import create_app

    get_settings.cache_clear()
    try:
        return create_app().openapi()
    finally:
        mp.undo()
        get_settings.cache_clear()


def _server_operations(openapi: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in openapi["paths"].items() for method in item}


def test_every_operation_is_reachable_through_the_sdk(openapi: dict[str, Any]) -> None:
    server = _server_operations(openapi)
    client = {(op.method, op.path) for op in registered_operations()}
    assert server - client - set(OMITTED) == set(), "operations the SDK cannot call"
    assert client - server == set(), "operations the SDK calls that the server does not have"
    assert set(OMITTED) <= server, "an omitted operation no longer exists: drop it from OMITTED"


def _resolve(openapi: dict[str, Any], schema: dict[str, Any]) -> str | None:
    ref = schema.get("$ref")
    return ref.rsplit("/", 1)[1] if ref else None


def test_every_response_schema_has_a_client_model(openapi: dict[str, Any]) -> None:
    """Each operation's 2xx body (and every schema it nests) has a model in the client."""
    schemas = openapi["components"]["schemas"]
    wanted: set[str] = set()

    def walk(name: str) -> None:
        if name in wanted:
            return
        wanted.add(name)
        text = repr(schemas[name])
        for other in schemas:
            if f"'#/components/schemas/{other}'" in text:
                walk(other)

    for path, item in openapi["paths"].items():
        for method, op in item.items():
            if (method.upper(), path) in OMITTED:
                continue
            for status, response in op["responses"].items():
                if status.startswith("2"):
                    body = response.get("content", {}).get("application/json", {}).get("schema", {})
                    name = _resolve(openapi, body)
                    if name:
                        walk(name)
    lists = {name for name in wanted if name.endswith("List")}  # pages: the client walks them itself
    assert wanted - lists - set(SCHEMAS) == set()


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_client_model_matches_the_server_schema(openapi: dict[str, Any], name: str) -> None:
    server = openapi["components"]["schemas"][name]
    model = SCHEMAS[name]
    assert set(model.model_fields) == set(server["properties"]), name
    server_required = set(server.get("required", []))
    client_required = {field for field, info in model.model_fields.items() if info.is_required()}
    # The client may default a field the server always sends (``object``), never require one it may omit.
    assert client_required <= server_required, name
