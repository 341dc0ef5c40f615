"""Every Prometheus metric ModelPress exports, and the registry a process serves.

Labels are bounded: queue names, step methods, statuses, error types, outcome classes and worker host
names; never a job id, tenant id or key. ``docs/operating.md`` says what each metric means.

Processes. The API serves ``/metrics`` itself. A Celery worker runs its tasks in forked pool children
that are recycled every few tasks, so an HTTP port per child would lose its counters at every recycle
and need a port per child; prometheus_client's multiprocess mode instead has every process of one
worker (the main process, its pool children, the embedded beat) write its values to memory-mapped
files in ``PROMETHEUS_MULTIPROC_DIR``, and the worker's main process serves their sum on
``MODELPRESS_METRICS_PORT``. So each deployment unit (API, each worker, maintenance) is one scrape
target, and nothing is lost when a child exits. ``modelpress worker``/``maintenance`` make a fresh
directory when the variable is unset; the variable must be in the environment before Python starts.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import REGISTRY, Collector

# The *_created series double a scrape's size and no dashboard or rule here reads them.
disable_created_metrics()

# Job waits are seconds to hours; steps seconds to a day.
WAIT_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 24 * 3600)
RUN_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 24 * 3600)
LAG_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 24 * 3600, 3 * 24 * 3600)
VERIFY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900)

# --- HTTP (the rest comes from prometheus-fastapi-instrumentator: http_requests_total, http_request_duration_seconds)
HTTP_IN_FLIGHT = Gauge(
    "modelpress_http_requests_in_flight", "API requests being served now", multiprocess_mode="livesum"
)

# --- jobs (recorded where the job's state changes: app/observability/jobs.py) -------------------------
JOBS_CREATED = Counter(
    "modelpress_jobs_created", "Jobs accepted by the API, by queue and step-method mix", ["queue", "methods"]
)
JOBS_STARTED = Counter(
    "modelpress_jobs_started", "Attempts claimed by a worker (retry=true: a re-queued job's later attempt)",
    ["queue", "retry"],
)  # fmt: skip
JOBS_FINISHED = Counter(
    "modelpress_jobs_finished",
    "Jobs that reached a final status (error_type: the failure's class, empty otherwise)",
    ["queue", "methods", "status", "error_type"],
)
JOB_QUEUE_WAIT = Histogram(
    "modelpress_job_queue_wait_seconds",
    "Created to first started (seconds), by queue and step-method mix",
    ["queue", "methods"],
    buckets=WAIT_BUCKETS,
)
JOB_RUN_TIME = Histogram(
    "modelpress_job_run_seconds",
    "Started to final status (seconds) of the attempt that ended the job",
    ["methods", "status"],
    buckets=RUN_BUCKETS,
)
STEP_DURATION = Histogram(
    "modelpress_job_step_seconds", "Run time of one pipeline step (seconds)", ["method", "status"], buckets=RUN_BUCKETS
)
JOB_RETRIES = Counter("modelpress_job_retries", "Jobs re-queued after their worker was lost (lease expired)", ["queue"])
LEASES_LOST = Counter(
    "modelpress_job_leases_lost", "Heartbeats that found the lease taken (the worker stops the job)", ["worker"]
)
JOB_CANCEL_REQUESTS = Counter(
    "modelpress_job_cancel_requests", "Cancellations asked for, by the job's status then", ["status"]
)

# --- workers (set by the worker process running a job) --------------------------------------------------
WORKER_HEARTBEAT = Gauge(
    "modelpress_worker_heartbeat_timestamp_seconds",
    "Unix time of the worker's last successful lease heartbeat (a running job's worker only)",
    ["worker"],
    multiprocess_mode="max",
)
WORKER_PROGRESS = Gauge(
    "modelpress_worker_job_progress_ratio",
    "Progress (0-1) of the job the worker runs or ran last",
    ["worker"],
    multiprocess_mode="mostrecent",
)
WORKER_STEP = Gauge(
    "modelpress_worker_step_running",
    "1 while the worker runs a step of this method, 0 once it ended",
    ["worker", "method"],
    multiprocess_mode="mostrecent",
)
WORKER_PEAK_RSS = Gauge(
    "modelpress_worker_peak_rss_bytes",
    "Peak resident memory of the worker process when its last step ended",
    ["worker"],
    multiprocess_mode="mostrecent",
)
WORKER_CUDA_PEAK = Gauge(
    "modelpress_worker_cuda_max_allocated_bytes",
    "torch.cuda.max_memory_allocated() when the worker's last step ended (GPU workers)",
    ["worker"],
    multiprocess_mode="mostrecent",
)

# --- webhooks (the relay, in the maintenance process) -----------------------------------------------------
WEBHOOK_ATTEMPTS = Counter(
    "modelpress_webhook_attempts",
    "Delivery attempts by answer class (2xx, 3xx, 4xx, 5xx, timeout, error, refused) and what followed"
    " (delivered, retrying, failed)",
    ["status_class", "outcome"],
)
WEBHOOK_LAG = Histogram(
    "modelpress_webhook_delivery_lag_seconds",
    "Event written to the outbox to its 2xx answer (seconds)",
    buckets=LAG_BUCKETS,
)
WEBHOOK_DISABLED = Counter("modelpress_webhook_endpoints_disabled", "Endpoints disabled by a 410 Gone answer")

# --- uploads -------------------------------------------------------------------------------------------
UPLOAD_BYTES = Counter("modelpress_upload_bytes", "Bytes of uploads verified and completed")
UPLOAD_VERIFY = Histogram(
    "modelpress_upload_verify_seconds",
    "Time to verify an upload's sizes and sha256 (seconds), by result (ok, invalid)",
    ["result"],
    buckets=VERIFY_BUCKETS,
)
UPLOADS_EXPIRED = Counter("modelpress_uploads_expired", "Uploads expired before completion (their files deleted)")


def methods_label(methods: Iterable[str]) -> str:
    """A job's step-method mix as one bounded label: the distinct methods, sorted, joined by ``+``."""
    return "+".join(sorted(set(methods))) or "none"


def worker_label(worker_id: str | None = None) -> str:
    """A worker's host name (``host:pid`` ids lose the pid: pool children are recycled, hosts are few)."""
    return (worker_id or socket.gethostname()).rsplit(":", 1)[0]


def multiprocess_dir() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR`` when this process writes its values there."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _Chain(Collector):
    """Several collectors as one (a registry's metrics plus the scrape-time ones)."""

    def __init__(self, collectors: Sequence[Collector]) -> None:
        self.collectors = collectors

    def collect(self) -> Iterable[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


def serving_registry(*extra: Collector) -> CollectorRegistry:
    """What this process's ``/metrics`` serves: its own metrics (every process of the group's, summed, in
    multiprocess mode) plus ``extra`` collectors evaluated at scrape time."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
        for collector in extra:
            registry.register(collector)
    else:
        registry.register(_Chain([REGISTRY, *extra]))
    return registry
