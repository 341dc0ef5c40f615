"""The Celery processes' observability, wired through Celery's signals (``workers.celery_app`` imports this).

- Logging: Celery leaves logging to us (``setup_logging`` has a receiver), so worker lines are text or
  JSON like the API's.
- Request ids: the id of the request that published a task rides in the message headers and becomes
  the task's ``request_id``; a ``run_job`` task puts its job id into the log context.
- Metrics: the main process of each worker serves ``/metrics`` on ``MODELPRESS_METRICS_PORT``, summing
  every process of the worker in multiprocess mode (see ``app.observability.metrics``).
- Traces: configured in the processes that run tasks (a prefork pool's children, after the fork).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from asgi_correlation_id import correlation_id
from celery import signals

from app.broker import MAINTENANCE_QUEUE, RUN_JOB_TASK
from app.config import get_settings
from app.observability import context, tracing
from app.observability.logs import configure_logging

log = logging.getLogger("modelpress.worker")

REQUEST_ID_HEADER = "modelpress_request_id"


def _role() -> str:
    return os.environ.get("MODELPRESS_PROCESS_ROLE", "worker")


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    configure_logging(get_settings(), _role())


@signals.celeryd_after_setup.connect
def _name_role(sender: str, instance: Any, **_: Any) -> None:
    # The maintenance worker is the one consuming the maintenance queue; its lines say so.
    queues = {q.name for q in instance.app.amqp.queues.consume_from.values()} if instance.app.amqp.queues else set()
    if queues == {MAINTENANCE_QUEUE}:
        os.environ["MODELPRESS_PROCESS_ROLE"] = "maintenance"
        configure_logging(get_settings(), "maintenance")


@signals.before_task_publish.connect
def _carry_request_id(headers: dict[str, Any] | None = None, **_: Any) -> None:
    request_id = correlation_id.get()
    if headers is not None and request_id:
        headers[REQUEST_ID_HEADER] = request_id


@signals.task_prerun.connect
def _task_context(task: Any = None, args: Any = None, **_: Any) -> None:
    context.clear_job()
    request = getattr(task, "request", None)
    carried = getattr(request, REQUEST_ID_HEADER, None) or (getattr(request, "headers", None) or {}).get(
        REQUEST_ID_HEADER
    )
    correlation_id.set(carried)
    if task is not None and task.name == RUN_JOB_TASK and args:
        context.job_id.set(str(args[0]))


@signals.task_postrun.connect
def _task_context_end(**_: Any) -> None:
    context.clear_job()
    correlation_id.set(None)


@signals.worker_init.connect
def _serve_metrics(sender: Any = None, **_: Any) -> None:
    """Main process, before the pool starts: a fresh multiprocess directory, then the metrics server."""
    settings = get_settings()
    pool = str(getattr(sender, "pool_cls", "")).lower()
    if "prefork" not in pool:  # threads / solo pools run tasks in this very process
        tracing.configure(settings, _role())
    if settings.metrics_port is None or not settings.metrics_enabled:
        return
    from prometheus_client import start_http_server

    from app.observability.metrics import multiprocess_dir, serving_registry

    folder = multiprocess_dir()
    if folder:
        # Files of an earlier run would add their counts to this one's. This process's own files stay: it
        # imported its metrics already and keeps writing to the files it opened (pool children come later).
        mine = f"_{os.getpid()}.db"
        for stale in Path(folder).glob("*.db"):
            if not stale.name.endswith(mine):
                stale.unlink(missing_ok=True)
    elif "prefork" in pool:
        log.warning("PROMETHEUS_MULTIPROC_DIR is not set: the pool processes' job metrics will be missing")
    start_http_server(settings.metrics_port, addr=settings.metrics_bind, registry=serving_registry())
    log.info("metrics on http://%s:%d/metrics", settings.metrics_bind, settings.metrics_port)


@signals.worker_process_init.connect
def _pool_process_init(**_: Any) -> None:
    tracing.configure(get_settings(), _role())


@signals.worker_process_shutdown.connect
def _pool_process_exit(pid: int | None = None, **_: Any) -> None:
    from app.observability.metrics import multiprocess_dir

    if multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())


def prepare_metrics_dir() -> None:
    """For ``modelpress worker``/``maintenance`` (before ``exec``): a fresh multiprocess directory when
    metrics are served and none was given (the variable must exist before Python imports the client)."""
    settings = get_settings()
    if settings.metrics_port is None or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    import tempfile

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="modelpress-metrics-")
