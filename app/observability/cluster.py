"""Gauges read at scrape time from the source of truth: jobs by status, broker queue depth, the webhook
outbox, and the heartbeat age of every worker that runs a job.

They describe the whole deployment, not one process, so one process serves them: the API (the only one
that is always up and already talks to the database and the broker). With several API replicas every one
reports the same values; the dashboard and the alert rules take ``max`` over instances. The queries are
small aggregate reads on indexed columns, and a result is reused for a few seconds so that several
scrapers (or an eager one) cost one round of queries.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from app.broker import MAINTENANCE_QUEUE
from app.config import Settings
from app.db import session_scope, utcnow
from app.jobs.models import Job
from app.observability.metrics import worker_label
from app.webhooks.models import WebhookDelivery, WebhookEndpoint

log = logging.getLogger("modelpress.metrics")

JOB_QUEUES = ("cpu", "gpu", MAINTENANCE_QUEUE)
JOB_STATUSES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")
# kombu's Redis transport keeps one list per priority level: the queue's name for level 0, then
# "<queue>\x06\x16<level>" (kombu.transport.redis's PRIORITY_STEPS separator); level 0 is popped first.
REDIS_PRIORITY_SEP = "\x06\x16"
PRIORITY_LEVELS = range(10)
CACHE_S = 5.0


def redis_queue_key(queue: str, level: int) -> str:
    """The Redis list that holds ``queue``'s messages of broker priority ``level``."""
    return queue if level == 0 else f"{queue}{REDIS_PRIORITY_SEP}{level}"


def queue_depths(settings: Settings) -> dict[tuple[str, int], int]:
    """Messages waiting per (queue, broker priority level): Redis ``LLEN``s in one round trip, or the
    file count of the embedded broker's folder (which has no priorities: level 0)."""
    url = settings.resolved_broker_url()
    if url.startswith("filesystem://"):
        depths = {(queue, 0): 0 for queue in JOB_QUEUES}
        # kombu's file-system transport names a message "<time>_<uuid>.<queue>.msg".
        for path in Path(settings.broker_folder(), "out").glob("*.msg"):
            queue = path.name[: -len(".msg")].rsplit(".", 1)[-1]
            depths[(queue, 0)] = depths.get((queue, 0), 0) + 1
        return depths
    client = _redis_client(url)
    keys = [(queue, level) for queue in JOB_QUEUES for level in PRIORITY_LEVELS]
    pipe = client.pipeline(transaction=False)
    for queue, level in keys:
        pipe.llen(redis_queue_key(queue, level))
    return dict(zip(keys, (int(n) for n in pipe.execute()), strict=True))


_clients: dict[str, Any] = {}


def _redis_client(url: str) -> Any:
    import redis

    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    return _clients[url]


class ClusterCollector(Collector):
    """The deployment-wide gauges (see the module docstring)."""

    def __init__(self, settings: Settings, cache_s: float = CACHE_S) -> None:
        self.settings = settings
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._at = -1e9
        self._cached: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            if time.monotonic() - self._at >= self.cache_s:
                self._cached = self._read()
                self._at = time.monotonic()
            return list(self._cached)

    def _read(self) -> list[Metric]:
        up = GaugeMetricFamily(
            "modelpress_scrape_source_up", "1 if the scrape-time gauges could read this source", labels=["source"]
        )
        families: list[Metric] = [up]
        try:
            families += self._database()
            up.add_metric(["database"], 1)
        except Exception:
            log.warning("metrics: the database could not be read", exc_info=True)
            up.add_metric(["database"], 0)
        try:
            depth = GaugeMetricFamily(
                "modelpress_queue_depth",
                "Messages waiting in the broker, per queue and broker priority level (0 is served first; "
                "a tenant of priority P is on level 9-P)",
                labels=["queue", "priority"],
            )
            for (queue, level), count in sorted(queue_depths(self.settings).items()):
                depth.add_metric([queue, str(level)], count)
            families.append(depth)
            up.add_metric(["broker"], 1)
        except Exception:
            log.warning("metrics: the broker could not be read", exc_info=True)
            up.add_metric(["broker"], 0)
        return families

    def _database(self) -> list[Metric]:
        now = utcnow()
        with session_scope() as session:
            by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            oldest_queued = session.execute(select(func.min(Job.created_at)).where(Job.status == "queued")).scalar()
            leases = session.execute(
                select(Job.worker_id, Job.lease_expires_at).where(
                    Job.status.in_(("running", "cancelling")), Job.lease_expires_at.is_not(None)
                )
            ).all()
            pending, oldest_pending = session.execute(
                select(func.count(), func.min(WebhookDelivery.created_at)).where(WebhookDelivery.status == "pending")
            ).one()
            disabled = session.execute(
                select(func.count()).select_from(WebhookEndpoint).where(WebhookEndpoint.enabled.is_(False))
            ).scalar_one()
        jobs = GaugeMetricFamily("modelpress_jobs", "Jobs by current status (from the database)", labels=["status"])
        for status in JOB_STATUSES:
            jobs.add_metric([status], by_status.get(status, 0))
        queued_age = GaugeMetricFamily(
            "modelpress_jobs_oldest_queued_age_seconds", "Age of the oldest queued job (0 when none waits)"
        )
        queued_age.add_metric([], (now - oldest_queued).total_seconds() if oldest_queued else 0.0)
        # A lease is renewed to now + lease_s at every heartbeat, so its last renewal was lease_s before expiry.
        ages: dict[str, float] = {}
        for worker_id, expires in leases:
            if expires is None:
                continue
            age = max((now - (expires - timedelta(seconds=self.settings.lease_s))).total_seconds(), 0.0)
            worker = worker_label(worker_id or "?")
            ages[worker] = max(ages.get(worker, 0.0), age)
        heartbeat = GaugeMetricFamily(
            "modelpress_worker_heartbeat_age_seconds",
            "Seconds since the last lease heartbeat of the jobs a worker runs (the oldest; workers with a job only)",
            labels=["worker"],
        )
        for worker, age in sorted(ages.items()):
            heartbeat.add_metric([worker], age)
        backlog = GaugeMetricFamily(
            "modelpress_webhook_outbox_pending", "Webhook deliveries not yet delivered or failed"
        )
        backlog.add_metric([], pending)
        backlog_age = GaugeMetricFamily(
            "modelpress_webhook_outbox_oldest_pending_age_seconds", "Age of the oldest pending delivery (0 when none)"
        )
        backlog_age.add_metric([], (now - oldest_pending).total_seconds() if oldest_pending else 0.0)
        disabled_gauge = GaugeMetricFamily(
            "modelpress_webhook_endpoints_disabled_current", "Webhook endpoints currently disabled"
        )
        disabled_gauge.add_metric([], disabled)
        return [jobs, queued_age, heartbeat, backlog, backlog_age, disabled_gauge]
