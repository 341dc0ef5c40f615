"""The client cannot fall behind the API: every operation in /openapi.json is one the SDK calls (or is
deliberately left out), and every response body is a shape of :mod:`modelpress.schemas`, the models the
server answers with and the client parses into."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

import modelpress._client  # noqa: F401 - registers every operation the SDK calls
import modelpress.schemas as wire
from modelpress._http import registered_operations

# The wire models by their own (OpenAPI component) names: the client's aliases (``Upload``, …) and the two
# bases left out.
SCHEMAS: dict[str, type[BaseModel]] = {
    name: value
    for name, value in vars(wire).items()
    if isinstance(value, type)
    and issubclass(value, BaseModel)
    and value.__module__ == wire.__name__
    and value.__name__ == name  # not an alias
    and name.isidentifier()  # not a parametrized ListOf[…], which pydantic registers in the module
    and value not in (wire.WireModel, wire.ListOf)
}

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


def test_every_response_schema_is_a_wire_model(openapi: dict[str, Any]) -> None:
    """Each operation's 2xx body (and every schema it nests) is a model of :mod:`modelpress.schemas`."""
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
    assert wanted - set(SCHEMAS) == set()
    assert {"JobOut", "UploadOut", "TenantLimits"} <= wanted  # the walk reached the bodies


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_wire_model_matches_the_server_schema(openapi: dict[str, Any], name: str) -> None:
    server = openapi["components"]["schemas"][name]
    model = SCHEMAS[name]
    assert set(model.model_fields) == set(server["properties"]), name
    server_required = set(server.get("required", []))
    client_required = {field for field, info in model.model_fields.items() if info.is_required()}
    # The client may default a field the server always sends (``object``), never require one it may omit.
    assert client_required <= server_required, name
