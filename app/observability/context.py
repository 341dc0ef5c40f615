"""What a log line is about: the request, tenant, job, attempt and step, carried in context variables.

Context variables follow the code that runs for one request (each request is its own asyncio task, and
Starlette copies the context into the thread that runs a sync endpoint) or one Celery task, so a value
set deep inside a service is on every later line of that request or task, and never leaks into another.
The request id itself lives in ``asgi_correlation_id`` (it reads and returns ``X-Request-ID``, and its
Celery extension carries the id from the API into the task the request enqueued).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from asgi_correlation_id import correlation_id

tenant_id: ContextVar[str | None] = ContextVar("modelpress_tenant_id", default=None)
job_id: ContextVar[str | None] = ContextVar("modelpress_job_id", default=None)
attempt: ContextVar[int | None] = ContextVar("modelpress_attempt", default=None)
step: ContextVar[str | None] = ContextVar("modelpress_step", default=None)

_FIELDS: dict[str, ContextVar[Any]] = {
    "request_id": correlation_id,
    "tenant_id": tenant_id,
    "job_id": job_id,
    "attempt": attempt,
    "step": step,
}
FIELDS = tuple(_FIELDS)


def current() -> dict[str, Any]:
    """The context fields that are set now (``None`` ones left out)."""
    return {name: value for name, var in _FIELDS.items() if (value := var.get()) is not None}


def clear_job() -> None:
    """Forget the job fields (a Celery worker process runs one task after another)."""
    for var in (tenant_id, job_id, attempt, step):
        var.set(None)
