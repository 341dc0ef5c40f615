"""The API's observability: request ids, the log context of a request, RED metrics and ``/metrics``."""

from __future__ import annotations

import hmac
import re
from functools import lru_cache
from typing import Any

from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.errors import Problem
from app.observability import context
from app.observability.metrics import HTTP_IN_FLIGHT

REQUEST_ID_HEADER = "X-Request-ID"
# A caller's request id is kept when it looks like one (a proxy's, a client's trace id); anything else
# (too long, odd characters that would spoil a log line) is replaced by a fresh one.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def valid_request_id(value: str) -> bool:
    return _REQUEST_ID.fullmatch(value) is not None


class RequestContextMiddleware:
    """Puts the tenant and the job a request was about into the log context before the response starts,
    so the access log line (and anything logged after it) carries them. FastAPI runs sync dependencies
    in worker threads whose context changes do not flow back, so they are read from what the request
    left behind: the authenticated principal (``request.state``) and the route's ``job_id``."""

    def __init__(self, app: ASGIApp, count_in_flight: bool = False) -> None:
        self.app = app
        self.in_flight = HTTP_IN_FLIGHT if count_in_flight else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_context(message: Message) -> None:
            if message["type"] == "http.response.start":
                principal = scope.get("state", {}).get("principal")
                if principal is not None:
                    context.tenant_id.set(principal.tenant_id)
                job = scope.get("path_params", {}).get("job_id")
                if job is not None:
                    context.job_id.set(job)
            await send(message)

        if self.in_flight is None:
            await self.app(scope, receive, send_with_context)
            return
        self.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_context)
        finally:
            self.in_flight.dec()


@lru_cache(maxsize=1)
def _http_metrics() -> Any:
    """The instrumentator's request counter and latency histograms, made once per process: each app built in
    the same process (the tests build several) records into them. The library's own default registers them
    per app and, finding them registered already, silently instruments the second app with nothing."""
    from prometheus_fastapi_instrumentator import metrics

    return metrics.default(latency_lowr_buckets=LATENCY_BUCKETS)


def install(app: FastAPI, settings: Settings) -> None:
    """Wire request ids, metrics and ``/metrics`` (and traces, when configured) into the API."""
    # Connects the Celery publish hook that carries the request id into the job's message.
    from app.observability import celery as _celery_signals  # noqa: F401
    from app.observability import tracing

    app.add_middleware(RequestContextMiddleware, count_in_flight=settings.metrics_enabled)
    if settings.metrics_enabled:
        from prometheus_fastapi_instrumentator import Instrumentator

        Instrumentator(
            should_group_status_codes=True,
            # Unmatched paths (scanners) all count as one "none" handler: the label stays bounded.
            should_group_untemplated=True,
            # In-flight requests are counted by RequestContextMiddleware: the instrumentator's gauge is made
            # per app and collides in a process that builds the app twice (the tests do).
            excluded_handlers=["/metrics"],
        ).add(_http_metrics()).instrument(app)
        _add_metrics_route(app, settings)
    # Outermost: every line of the request, the access line included, has its id.
    app.add_middleware(
        CorrelationIdMiddleware, header_name=REQUEST_ID_HEADER, validator=valid_request_id, update_request_header=True
    )
    tracing.instrument_fastapi(app, settings)


def _add_metrics_route(app: FastAPI, settings: Settings) -> None:
    from app.observability.cluster import ClusterCollector
    from app.observability.metrics import serving_registry

    registry = serving_registry(ClusterCollector(settings))
    token = settings.metrics_token

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        """Prometheus exposition of this process (and the deployment-wide gauges); no tenant key needed."""
        if token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
                raise Problem(
                    401, "Unauthorized", "/metrics needs 'Authorization: Bearer <MODELPRESS_METRICS_TOKEN>'",
                    headers={"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
        # The scrape-time gauges query the database: off the event loop.
        body: Any = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)
