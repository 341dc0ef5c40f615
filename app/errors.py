"""RFC 9457 problem details for every error the API returns."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://modelpress.dev/problems/"
log = logging.getLogger("modelpress.api")


class Problem(Exception):  # noqa: N818 - it is a response, raised
    """Raise to answer with a problem+json body."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type_ or TYPE_BASE + title.lower().replace(" ", "-")
        self.headers = headers
        self.extra = extra


def not_found(what: str, ident: str) -> Problem:
    return Problem(404, "Not Found", f"{what} {ident!r} does not exist")


def conflict(detail: str) -> Problem:
    return Problem(409, "Conflict", detail)


def unprocessable(detail: str, errors: list[dict[str, Any]] | None = None) -> Problem:
    return Problem(422, "Unprocessable Content", detail, type_=TYPE_BASE + "validation", errors=errors or [])


def problem_response(problem: Problem, instance: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": problem.type, "title": problem.title, "status": problem.status}
    if problem.detail:
        body["detail"] = problem.detail
    if instance:
        body["instance"] = instance
    body.update(problem.extra)
    return JSONResponse(body, status_code=problem.status, media_type=PROBLEM_JSON, headers=problem.headers)


def _field_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    errors = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part not in ("body",)]
        # Discriminated unions add the tag to the path ("steps.0.quantize.scheme"); keep it readable.
        errors.append({"field": ".".join(loc), "message": err.get("msg", ""), "type": err.get("type", "")})
    return errors


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _field_errors(exc)
        detail = "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors[:5])
        return problem_response(unprocessable(detail, errors), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        titles = {401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed"}
        headers = dict(exc.headers) if exc.headers else {}
        if exc.status_code == 405:
            # Starlette names only the methods of the first route matching the path; a path served by
            # several routes (GET and PATCH …/{id}) must list them all.
            headers["Allow"] = ", ".join(_allowed_methods(app, request))
        problem = Problem(exc.status_code, titles.get(exc.status_code, "Error"), str(exc.detail), headers=headers)
        return problem_response(problem, request.url.path)

    async def _infrastructure(request: Request, exc: Exception) -> JSONResponse:
        dependency = unavailable_dependency(exc)
        if dependency is None:  # e.g. a StorageError that is no outage: a bug, as any other
            return _server_error(request, exc)
        log.warning("%s unavailable on %s: %s", dependency, request.url.path, exc)
        return problem_response(service_unavailable(dependency), request.url.path)

    for exc_class in _infrastructure_exceptions():
        app.add_exception_handler(exc_class, _infrastructure)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        return _server_error(request, exc)


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    from starlette.routing import Match

    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        route_methods = getattr(route, "methods", None)
        if match != Match.NONE and route_methods:
            methods |= set(route_methods)
    return sorted(methods)


def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s", request.url.path, exc_info=exc)
    return problem_response(Problem(500, "Internal Server Error", "an unexpected error occurred"), request.url.path)


def service_unavailable(dependency: str) -> Problem:
    """503 with ``Retry-After``: an outage is transient, and the client should be able to tell it from a bug."""
    from app.config import get_settings

    retry_after = get_settings().unavailable_retry_after_s
    return Problem(
        503,
        "Service Unavailable",
        f"the {dependency} is unavailable; retry in {retry_after} s",
        type_=TYPE_BASE + "unavailable",
        headers={"Retry-After": str(retry_after)},
        dependency=dependency,
    )


def _infrastructure_exceptions() -> dict[type[Exception], str]:
    """Exception classes that mean "a dependency is unreachable", each with the dependency's name.

    The database: connection-level DBAPI errors (refused, reset, server gone) and a pool that cannot
    hand out a connection; an ``IntegrityError`` or a ``DataError`` is no outage. The broker: kombu's
    and redis-py's connection errors. Storage: botocore's transport errors (endpoint unreachable,
    connection closed, timeouts), not S3's answers (``NoSuchKey``, ``AccessDenied``).
    """
    import botocore.exceptions as boto
    import kombu.exceptions
    import redis.exceptions
    import sqlalchemy.exc as sa

    from app.storage import StorageError

    return {
        sa.OperationalError: "database",
        sa.InterfaceError: "database",
        sa.TimeoutError: "database",
        kombu.exceptions.OperationalError: "broker",
        redis.exceptions.ConnectionError: "broker",
        redis.exceptions.TimeoutError: "broker",
        boto.ConnectionError: "storage",  # endpoint unreachable, connect timeout, proxy refused
        boto.HTTPClientError: "storage",  # connection closed mid-request, read timeout
        StorageError: "storage",  # only when it wraps one of the above (see unavailable_dependency)
    }


def unavailable_dependency(exc: BaseException) -> str | None:
    """The dependency (``database``, ``broker``, ``storage``) whose outage ``exc`` is, or None.

    Follows ``__cause__``/``__context__``: a service may wrap a transport error in its own exception.
    """
    import sqlalchemy.exc as sa

    from app.storage import StorageError, StorageUnavailableError

    classes = _infrastructure_exceptions()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for exc_class, dependency in classes.items():
            if isinstance(current, exc_class) and exc_class is not StorageError:
                return dependency
        if isinstance(current, sa.DBAPIError) and current.connection_invalidated:
            return "database"
        if isinstance(current, StorageUnavailableError):  # e.g. S3 answering 503 SlowDown: no transport error below
            return "storage"
        current = current.__cause__ or current.__context__
    return None


class ProblemDetails(BaseModel):
    """RFC 9457 problem details: the body of every error response (``application/problem+json``)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="a URI naming the kind of problem")
    title: str
    status: int
    detail: str | None = None
    instance: str | None = Field(default=None, description="the request path")
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="validation: one entry per field ('field', 'message', 'type')"
    )


_PROBLEM_TEXT = {
    400: "Bad Request",
    401: "Unauthorized: no key, or an invalid or revoked one",
    403: "Forbidden: the key lacks the scope",
    404: "Not Found (another tenant's resource looks the same)",
    409: "Conflict: the resource's state does not allow this",
    413: "Content Too Large: the request body or the declared upload exceeds its limit",
    422: "Unprocessable Content: validation failed; `errors` names each field",
    429: "Too Many Requests: rate limit or quota; see Retry-After",
    503: "Service Unavailable: the database, broker or storage is unreachable; see Retry-After",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}


def _problem_codes(path: str, method: str, operation: dict[str, Any]) -> list[int]:
    """The problem statuses an operation can answer, from what it is: authenticated, addressed by id,
    with a body, changing state."""
    codes = {400, 503}
    if path.startswith("/v1/"):
        codes |= {401, 403, 429}
    if "{" in path:
        codes.add(404)
    if operation.get("parameters") or operation.get("requestBody"):
        codes.add(422)
    if "requestBody" in operation:
        codes.add(413)
    if method in ("post", "put", "patch", "delete"):
        codes |= {409, 413}
    return sorted(codes)


def document_problems(app: FastAPI) -> None:
    """Describe the error contract in the OpenAPI document: every operation lists the problem statuses
    it can answer, each as ``application/problem+json`` with the :class:`ProblemDetails` schema (FastAPI's
    own 422 entry, ``application/json`` with ``HTTPValidationError``, is replaced), and API-key auth as a
    bearer security scheme."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        schemas["ProblemDetails"] = ProblemDetails.model_json_schema(ref_template="#/components/schemas/{model}")
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer", "description": "API key"}}
        content = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}}
        for path, item in schema.get("paths", {}).items():
            for method, operation in item.items():
                if path.startswith("/v1/"):
                    operation["security"] = [{"apiKey": []}]
                responses = operation.setdefault("responses", {})
                for code in _problem_codes(path, method, operation):
                    entry: dict[str, Any] = {"description": _PROBLEM_TEXT[code], "content": content}
                    if code in (429, 503):
                        entry["headers"] = _RETRY_AFTER
                    responses[str(code)] = entry
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
