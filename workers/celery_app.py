"""Celery configuration for ModelPress workers, in one place.

Late acknowledgement and a prefetch of one: a job message is acked only once the job has finished,
and a worker never hoards messages it cannot start. Jobs go to the ``cpu`` or ``gpu`` queue; the
periodic tasks (with ``--beat``) to ``maintenance``, which a separate small worker consumes so they
never wait behind a job. A worker consumes the queues named by ``modelpress worker --queues``.
"""

from __future__ import annotations

from kombu import Queue

# Celery signal handlers: the metrics server, job log context and request ids, traces (connected on import).
import app.observability.celery  # noqa: F401
from app.broker import MAINTENANCE_QUEUE, REAP_TASK, SWEEP_STORAGE_TASK, make_celery
from app.config import get_settings
from app.uploads.service import EXPIRE_UPLOADS_TASK
from app.webhooks.relay import WEBHOOK_RELAY_TASK
from app.webhooks.service import PRUNE_DELIVERIES_TASK
from workers.liveness import ProcessHeartbeat

settings = get_settings()
celery_app = make_celery(settings)
celery_app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_queues=[Queue("cpu"), Queue("gpu"), Queue(MAINTENANCE_QUEUE)],
    task_time_limit=settings.job_time_limit_s,
    task_soft_time_limit=max(settings.job_time_limit_s - 60, 1),
    # Model work fragments memory; recycle worker processes now and then.
    worker_max_tasks_per_child=20,
    worker_concurrency=settings.worker_concurrency,
    worker_hijack_root_logger=False,
    beat_schedule={
        "reap-expired-leases": {
            "task": REAP_TASK,
            "schedule": settings.reaper_interval_s,
            "options": {"queue": MAINTENANCE_QUEUE},
        },
        # Expires: runs that waited (a slow round, a restart) are dropped rather than piling up; the next catches up.
        "deliver-webhooks": {
            "task": WEBHOOK_RELAY_TASK,
            "schedule": settings.webhook_relay_interval_s,
            "options": {"queue": MAINTENANCE_QUEUE, "expires": max(settings.webhook_relay_interval_s * 5, 10.0)},
        },
        "expire-uploads": {
            "task": EXPIRE_UPLOADS_TASK,
            "schedule": 600.0,
            "options": {"queue": MAINTENANCE_QUEUE, "expires": 600.0},
        },
        # Attempt artifacts and checkpoints that a killed worker or an outage during cleanup left behind.
        "sweep-storage": {
            "task": SWEEP_STORAGE_TASK,
            "schedule": settings.storage_sweep_interval_s,
            "options": {"queue": MAINTENANCE_QUEUE, "expires": settings.storage_sweep_interval_s},
        },
        "prune-webhook-deliveries": {
            "task": PRUNE_DELIVERIES_TASK,
            "schedule": 3600.0,
            "options": {"queue": MAINTENANCE_QUEUE, "expires": 600.0},
        },
    },
    imports=["workers.tasks"],
)
# Every worker process (job workers and maintenance) says it is alive; /readyz reads it.
celery_app.steps["worker"].add(ProcessHeartbeat)
