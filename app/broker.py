"""The Celery client both sides share: the API publishes job messages, workers consume them.

The broker is a doorbell, not a database: a message only says "job X is ready"; Postgres holds the
truth, so a lost or duplicated message is harmless (the claim is a guarded UPDATE, and the reaper
re-sends jobs that stayed queued too long).
"""

from __future__ import annotations

import logging
import os
import uuid
from contextlib import suppress
from functools import lru_cache
from time import monotonic
from typing import Any

from celery import Celery
from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

from app.config import Settings, get_settings

RUN_JOB_TASK = "modelpress.run_job"
REAP_TASK = "modelpress.reap"
SWEEP_STORAGE_TASK = "modelpress.sweep_storage"
# The periodic tasks (reaper, webhook relay, delivery pruning, upload expiry) have a queue of their own,
# consumed by a small worker process of their own: a job worker is busy for hours, and webhooks must
# not wait for it.
MAINTENANCE_QUEUE = "maintenance"
log = logging.getLogger("modelpress.broker")


class _WholeMessageChannel(filesystem.Channel):
    """kombu's file-system channel, except that a message file appears only whole.

    kombu writes each message in place, so a consumer polling at that moment can take an empty or half-written
    file and die on it (celery/kombu#1551: the embedded maintenance worker stopped a few minutes after start,
    and with it the reaper and the webhook relay). Here the message is written under a hidden temporary name,
    which the consumer skips (it takes only ``*.<queue>.msg``), and renamed into place in one step.
    """

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]  # kombu: (queue, message)
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        temporary = os.path.join(self.data_folder_out, f".{uuid.uuid4()}.tmp")
        try:
            with open(temporary, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))
            os.replace(temporary, final)
        except OSError as exc:
            with suppress(OSError):
                os.remove(temporary)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class WholeMessageFilesystemTransport(filesystem.Transport):
    """The embedded broker: kombu's file-system transport with :class:`_WholeMessageChannel`."""

    Channel = _WholeMessageChannel


EMBEDDED_TRANSPORT = "modelpress-filesystem"
TRANSPORT_ALIASES.setdefault(EMBEDDED_TRANSPORT, f"{__name__}:WholeMessageFilesystemTransport")


def broker_url(settings: Settings) -> str:
    """The broker URL, with the embedded ``filesystem://`` served by :class:`WholeMessageFilesystemTransport`."""
    url = settings.resolved_broker_url()
    if url.startswith("filesystem://"):
        return EMBEDDED_TRANSPORT + url.removeprefix("filesystem")
    return url


def make_celery(settings: Settings) -> Celery:
    celery = Celery("modelpress", broker=broker_url(settings))
    conf: dict[str, object] = {
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": "cpu",
        "broker_connection_retry_on_startup": True,
    }
    if settings.resolved_broker_url().startswith("filesystem://"):
        # Embedded mode: a server-less broker in the data directory (kombu's file-system transport).
        folder = settings.broker_folder()
        for sub in ("out", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "out"),
            "data_folder_out": str(folder / "out"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": settings.broker_polling_interval_s,
        }
    else:
        conf["broker_transport_options"] = {
            # Redelivery after a lost worker: longer than any single job may run.
            "visibility_timeout": settings.job_time_limit_s + 3600,
            # One Redis list per priority level (0 is popped first), so tenant priorities order the queue.
            # queue_order_strategy stays round-robin: "priority" would rank whole queues (cpu before gpu),
            # not messages, and starve the second queue of a worker that consumes both.
            "priority_steps": list(range(10)),
        }
    celery.conf.update(conf)
    return celery


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def broker_priority(tenant_priority: int | None) -> int:
    """Tenant priority 0 (low) … 9 (high) → the Redis transport's message priority, where 0 is served first.

    ``None`` (a caller that did not look the tenant up) gets the middle of the range, never 0:
    kombu treats a message without priority as the most urgent.
    """
    level = 5 if tenant_priority is None else min(max(tenant_priority, 0), 9)
    return 9 - level


def enqueue_job(job_id: str, queue: str, priority: int | None = None, countdown: float | None = None) -> bool:
    """Publish the doorbell for a committed job. Failures are logged, not raised: the reaper re-sends.

    ``priority`` is the tenant's (0 low … 9 high); ``countdown`` delays delivery (a job deferred by its
    tenant's running-jobs quota is rung again a little later).
    """
    try:
        get_celery().send_task(
            RUN_JOB_TASK, args=[job_id], queue=queue, priority=broker_priority(priority), countdown=countdown
        )
        return True
    except Exception:
        log.exception("could not enqueue job %s; the reaper will retry", job_id)
        return False


def check_broker() -> None:
    with get_celery().connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
