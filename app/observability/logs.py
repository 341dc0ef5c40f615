"""One logging set-up for every process: human-readable text (``make dev``) or JSON lines (production).

Every record gets the context fields (``request_id``, ``tenant_id``, ``job_id``, ``attempt``, ``step``)
that apply where it was logged, so ``grep job_…`` over the API, worker and maintenance logs shows a job's
whole life, and the request id of the POST that created it. A field passed explicitly with
``extra={"job_id": …}`` wins over the context (the webhook relay logs many jobs' deliveries in one task).
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from app.config import Settings
from app.observability import context

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s%(context)s"
# Loggers that install their own handlers (uvicorn) are routed through the root logger's one handler.
_ADOPTED = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task", "celery.worker")


class ContextFilter(logging.Filter):
    """Copies the context fields onto the record (as attributes) and renders them for the text format."""

    def filter(self, record: logging.LogRecord) -> bool:
        shown = []
        for name, value in context.current().items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        for name in context.FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                shown.append(f"{name}={value}")
        record.context = f" [{' '.join(shown)}]" if shown else ""
        return True


def make_formatter(log_format: str, process: str) -> logging.Formatter:
    """The formatter for ``log_format`` (``json`` or ``text``); JSON lines name the process too."""
    if log_format == "json":
        return JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"service": process},
            reserved_attrs=[*RESERVED_ATTRS, "taskName", "context"],
            timestamp=False,
        )
    return logging.Formatter(TEXT_FORMAT)


def configure_logging(settings: Settings, process: str) -> None:
    """Send every log record of this process to stderr, formatted as ``settings.log_format``.

    ``process`` (``api``, ``worker``, ``maintenance``) is the ``service`` field of every JSON line. Idempotent: a
    second call replaces the handler it installed.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(settings.log_format, process))
    handler.addFilter(ContextFilter())
    handler.set_name("modelpress")
    root = logging.getLogger()
    # Ours from an earlier call, and plain stream handlers (logging.basicConfig's); others (a test
    # harness's capture) stay.
    for old in [h for h in root.handlers if h.get_name() == "modelpress" or type(h) is logging.StreamHandler]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    for name in _ADOPTED:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
