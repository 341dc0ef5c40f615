"""OpenTelemetry traces, off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.

When on, the maintained instrumentations trace FastAPI (each request), SQLAlchemy (each statement),
httpx (webhook deliveries), botocore (each S3 call) and Celery (publish and run, with the trace context
carried in the message headers). So one job's trace runs from ``POST /v1/jobs`` through its INSERTs, the
Celery publish, the worker's run (claim UPDATE, S3 downloads, one span per pipeline step, the artifact
uploads, the final UPDATE). Webhook deliveries are sent later by the relay, in traces of their own that
carry ``modelpress.job_id``. Exported over OTLP/HTTP with the SDK's standard ``OTEL_*`` variables.

The OpenTelemetry packages are the ``observability`` extra and are imported only here, only when
enabled: processes without an endpoint load none of them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from app.config import Settings

log = logging.getLogger("modelpress.tracing")

_configured_pid: int | None = None
_open_steps: dict[str, tuple[Any, Any]] = {}


def enabled() -> bool:
    """Whether this process exports traces."""
    return _configured_pid == os.getpid()


def configure(settings: Settings, service: str) -> bool:
    """Set up the tracer provider and the library instrumentations in this process (once); False when
    no OTLP endpoint is configured. A forked child (a Celery pool process) must call it itself: the
    exporter's background thread does not survive a fork."""
    global _configured_pid
    if not settings.otel_exporter_otlp_endpoint:
        return False
    if enabled():
        return True
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.botocore import BotocoreInstrumentor
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = settings.otel_service_name or f"modelpress-{service}"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # endpoint etc. from OTEL_* variables
    trace.set_tracer_provider(provider)
    from app.db import get_engine

    # app.db imported create_engine before it could be patched: its engine is traced by name (made here if
    # it was not yet); engines made elsewhere later go through the patched create_engine.
    # skip_dep_check: the instrumentation declares sqlalchemy < 2.1 and would silently do nothing on 2.1,
    # whose engine events it uses are unchanged (tests/app/test_tracing.py checks the SQL spans arrive).
    SQLAlchemyInstrumentor().instrument(engine=get_engine(), skip_dep_check=True)
    HTTPXClientInstrumentor().instrument()
    BotocoreInstrumentor().instrument()
    CeleryInstrumentor().instrument()
    _configured_pid = os.getpid()
    log.info("tracing to %s as %s", settings.otel_exporter_otlp_endpoint, name)
    return True


def instrument_fastapi(app: Any, settings: Settings) -> None:
    """Trace the API's requests (health checks and scrapes left out), when tracing is configured."""
    if not configure(settings, "api"):
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, excluded_urls="metrics,healthz,readyz")


def start_step(job_id: str, index: int, method: str) -> None:
    """Open the span of a pipeline step, current until :func:`end_step` (the runner's thread runs both)."""
    if not enabled():
        return
    from opentelemetry import context, trace

    span = trace.get_tracer("modelpress").start_span(
        f"step {index} {method}",
        attributes={"modelpress.job_id": job_id, "modelpress.step.index": index, "modelpress.step.method": method},
    )
    _open_steps[job_id] = (span, context.attach(trace.set_span_in_context(span)))


def end_step(job_id: str, status: str) -> None:
    """Close the step's span with its final status."""
    entry = _open_steps.pop(job_id, None)
    if entry is None:
        return
    from opentelemetry import context
    from opentelemetry.trace import Status, StatusCode

    span, token = entry
    span.set_attribute("modelpress.step.status", status)
    if status == "failed":
        span.set_status(Status(StatusCode.ERROR))
    try:
        context.detach(token)
    finally:
        span.end()


def annotate(**attributes: Any) -> None:
    """Add attributes (``modelpress.*``) to the current span, when tracing is on."""
    if not enabled():
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    for key, value in attributes.items():
        if value is not None:
            span.set_attribute(f"modelpress.{key}", value)
