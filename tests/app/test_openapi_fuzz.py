"""schemathesis over ``/openapi.json``: no server error and no conformance failure (status codes, media
types, response schemas, headers) on any documented operation. Marked ``fuzz``: generated requests (12 per
operation, 3 in the fast tier) with a fixed seed against the real app in-process (ASGI), on Postgres + Redis +
an S3 server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

EXAMPLES_PER_OPERATION = 12  # `make test` (marked slow)
FAST_EXAMPLES_PER_OPERATION = 3  # `make test-fast`: the first few of the same fixed-seed requests


@pytest.fixture
def fuzz_headers(pg_stack: dict[str, str]) -> dict[str, str]:
    from app.auth.service import ALL_SCOPES, create_key, create_tenant
    from app.db import session_scope, utcnow
    from app.heartbeats.service import ROLE_MAINTENANCE, record_heartbeat

    with session_scope() as session:
        tenant = create_tenant(session, "fuzz", rate_limit_per_minute=1_000_000, max_queued_jobs=100_000)
        _, clear = create_key(session, tenant.id, "fuzz", list(ALL_SCOPES))
        # A deployment is ready with its maintenance process alive: this one has none, so say it beat just now.
        record_heartbeat(
            session,
            hostname="maintenance@fuzz",
            role=ROLE_MAINTENANCE,
            queues=["maintenance"],
            pid=1,
            started_at=utcnow(),
        )
    return {"Authorization": f"Bearer {clear}"}


def _app() -> Any:
    # Built at import (schemathesis reads the document at collection); every setting a route uses is read
    # per request, so the stack the fixture configures is the one the requests meet.
    from app.main import create_app

    return create_app()


# A schema-valid request may still be refused for a documented reason the JSON schema cannot express:
# 422 for semantic rules (exactly one of upload_id/uri, an unsafe webhook URL, an unknown upload), 413
# for a size over an operator-configured limit. Every other check (no 5xx, documented statuses, media
# types, response schemas and headers, Allow) applies in full.
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "3xx", "401", "403", "404", "409", "413", "422", "429"]
            }
        }
    }
)
schema = schemathesis.openapi.from_asgi("/openapi.json", _app(), config=CONFIG)


def _conformance_test(examples: int) -> Callable[[Callable[..., None]], Any]:
    """A schemathesis test of every operation, ``examples`` fixed-seed requests each."""

    def decorate(test: Callable[..., None]) -> Any:
        fixed_seed = settings(
            max_examples=examples,
            derandomize=True,  # a fixed seed: the same requests on every run
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        return pytest.mark.fuzz(pytest.mark.timeout(900)(schema.parametrize()(fixed_seed(test))))

    return decorate


def _call_and_validate(case: Any, headers: dict[str, str]) -> None:
    excluded = []
    if case.operation.method.upper() == "GET":
        # A single-valued query parameter sent several times (?after=a&after=b) is read as its last value,
        # as every Starlette app does; schemathesis counts accepting it as a schema violation.
        excluded.append(schemathesis.checks.negative_data_rejection)
    case.call_and_validate(headers=headers, excluded_checks=excluded)


@_conformance_test(FAST_EXAMPLES_PER_OPERATION)
def test_api_conforms_to_its_openapi_document(case: Any, fuzz_headers: dict[str, str]) -> None:
    _call_and_validate(case, fuzz_headers)


@pytest.mark.slow
@_conformance_test(EXAMPLES_PER_OPERATION)
def test_api_conforms_to_its_openapi_document_in_depth(case: Any, fuzz_headers: dict[str, str]) -> None:
    _call_and_validate(case, fuzz_headers)


def test_every_operation_documents_its_problems() -> None:
    """Each operation lists its error statuses as application/problem+json with the ProblemDetails schema,
    and FastAPI's application/json HTTPValidationError is gone."""
    document = _app().openapi()
    problem = {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            errors = {code: entry for code, entry in operation["responses"].items() if code[0] in "45"}
            assert {"400", "503"} <= set(errors), (method, path)
            if path.startswith("/v1/"):
                assert {"401", "403", "429"} <= set(errors), (method, path)
                assert operation["security"] == [{"apiKey": []}]
            for code, entry in errors.items():
                assert entry["content"] == {"application/problem+json": problem}, (method, path, code)
            assert "Retry-After" in errors["503"]["headers"]
