"""Every setting ModelPress reads, in one place (environment variables prefixed ``MODELPRESS_``).

The defaults are the embedded mode: SQLite, a local artifact directory and a file-system broker, so
``make dev`` needs no servers. Production sets the database, broker and S3 variables.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPRESS_", env_file=".env", extra="ignore")

    environment: Literal["development", "production", "test"] = "development"
    data_dir: Path = Field(default=Path("var"), description="embedded mode: database, broker and storage files")
    public_base_url: str = Field(default="http://127.0.0.1:8000", description="base of URLs handed to clients")

    # Database
    database_url: str = Field(default="", description="SQLAlchemy URL; default sqlite in data_dir")

    # Broker (Celery)
    broker_url: str = Field(default="", description="Celery broker; default filesystem:// in data_dir")
    broker_polling_interval_s: float = 0.2

    # Storage
    storage_backend: Literal["local", "s3"] = "local"
    storage_dir: Path | None = Field(default=None, description="local backend root; default data_dir/storage")
    s3_bucket: str = "modelpress"
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = Field(default=None, description="endpoint used in presigned URLs")
    s3_region: str = "us-east-1"
    s3_multipart_threshold_bytes: int = 64 * 1024 * 1024
    s3_multipart_part_bytes: int = 64 * 1024 * 1024
    allowed_source_buckets: list[str] = Field(default_factory=list, description="buckets model.uri may name")

    # URL signing (local storage URLs) — must be shared by the API and workers.
    signing_secret: str = Field(default="", description="HMAC secret for local signed URLs; default a file in data_dir")
    presign_ttl_s: int = Field(default=900, ge=10, le=7 * 24 * 3600)

    # Encryption at rest of secrets the service reads back (webhook signing secrets) — shared too.
    encryption_keys: str = Field(
        default="",
        description="comma-separated Fernet keys; the first encrypts, all decrypt; default a key file in data_dir",
    )

    # Limits
    max_request_body_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="API request bodies (JSON); larger ones get 413"
    )
    max_model_bytes: int = 50 * 1024**3
    max_model_memory_bytes: int | None = Field(
        default=None,
        ge=1,
        description="memory a job's model may take on a worker at the pipeline's peak (about twice its float32 "
        "size, counted from the safetensors headers before loading); default: the machine's physical memory",
    )
    max_upload_bytes: int = 100 * 1024**3
    max_upload_files: int = 512

    # Workers
    lease_s: int = Field(default=60, ge=2)
    heartbeat_s: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    job_time_limit_s: int = 24 * 3600
    # A few seconds: the reaper also rings jobs whose doorbell could not be sent (broker down at creation).
    reaper_interval_s: float = Field(default=5.0, gt=0)
    requeue_stale_queued_s: int = 300
    gpu_queue: bool = Field(default=False, description="route 'auto' jobs to the gpu queue (GPU workers exist)")
    worker_concurrency: int = 1
    # Process liveness (not job leases): every worker and the maintenance process write a heartbeat row this
    # often; /readyz is 503 when the maintenance heartbeat is older than liveness_stale_s.
    liveness_interval_s: float = Field(default=10.0, gt=0, description="how often a worker process says it is alive")
    liveness_stale_s: float = Field(
        default=60.0, gt=0, description="a process heartbeat older than this is stale (maintenance: /readyz 503)"
    )
    work_dir: Path | None = Field(default=None, description="scratch space for workers; default data_dir/work")
    # Infrastructure failures (database, broker, storage unreachable): the attempt is released and retried.
    max_infra_retries: int = Field(
        default=20, ge=0, description="releases of a job after outages (not counted in max_attempts) before it fails"
    )
    infra_retry_backoff_s: float = Field(default=5.0, gt=0, description="first re-delivery delay after an outage")
    infra_retry_max_backoff_s: float = Field(default=120.0, gt=0, description="cap of the doubling delay")
    dependency_wait_s: float = Field(
        default=60.0, ge=0, description="a job worker holds a message this long waiting for its database/storage"
    )
    storage_sweep_interval_s: float = Field(
        default=600.0, gt=0, description="period of the sweep of attempt artifacts and checkpoints nobody owns"
    )
    scratch_sweep_interval_s: float = Field(
        default=10.0, ge=0, description="a job worker sweeps its scratch directories at most this often"
    )

    # Quotas: operator defaults; a tenant row overrides each one (null there = this default).
    quota_running_jobs: int = Field(default=2, ge=1, description="jobs of one tenant running at once")
    quota_queued_jobs: int = Field(default=100, ge=1, description="jobs of one tenant waiting in the queue")
    quota_upload_bytes_per_day: int = Field(default=1024**4, ge=1, description="upload bytes per rolling 24 h")
    quota_requests_per_minute: int = Field(default=600, ge=1, description="API requests per minute per key")
    quota_retry_after_s: int = Field(default=15, ge=1, description="Retry-After of a full queue; worker re-try")
    api_database_pool_size: int = Field(
        default=32,
        ge=1,
        le=1000,
        description="database connections an API process keeps for its request path (authentication, job reads): "
        "about its concurrent requests; a burst beyond it opens up to half as many more, closed after use",
    )
    unavailable_retry_after_s: int = Field(
        default=5, ge=1, description="Retry-After of a 503 while the database, broker or storage is unreachable"
    )
    default_priority: int = Field(default=5, ge=0, le=9, description="tenant priority 0 (low) … 9 (high)")

    # Auth
    bootstrap_api_key: str | None = Field(default=None, description="dev only: a key for the 'default' tenant")

    # Webhooks / outbound URLs
    allow_http_urls: bool = False
    url_allowlist: list[str] = Field(default_factory=list, description="hosts exempt from the private-IP check")
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=60, description="per-attempt connect/read timeout")
    webhook_max_attempts: int = Field(default=17, ge=1, description="attempts per delivery (~3 days of backoff)")
    webhook_secret_overlap_s: int = Field(default=24 * 3600, ge=0, description="old secret still signs after rotation")
    webhook_progress_interval_s: float = Field(default=5.0, ge=0, description="at most one job.progress per job per …")
    webhook_relay_interval_s: float = Field(default=2.0, gt=0, description="period of the relay's beat task")
    webhook_delivery_retention_days: float = Field(
        default=30, gt=0, description="finished deliveries and their attempt log are deleted after this"
    )

    # Observability (app/observability): logs, Prometheus metrics, OpenTelemetry traces.
    log_format: Literal["text", "json"] = Field(
        default="text", description="'json': one JSON object a line (production); 'text': human-readable (make dev)"
    )
    log_level: str = "INFO"
    metrics_enabled: bool = Field(default=True, description="record Prometheus metrics and serve /metrics")
    metrics_token: str | None = Field(
        default=None, description="when set, the API's /metrics answers only 'Authorization: Bearer <token>'"
    )
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="worker and maintenance processes: serve /metrics on this port"
    )
    metrics_bind: str = Field(default="127.0.0.1", description="address the worker/maintenance /metrics binds")
    # The OpenTelemetry SDK's own variable names, so the usual collector set-ups work unchanged.
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None,
        validation_alias="OTEL_EXPORTER_OTLP_ENDPOINT",
        description="traces are exported (OTLP/HTTP) only when this is set",
    )
    otel_service_name: str | None = Field(default=None, validation_alias="OTEL_SERVICE_NAME")

    @model_validator(mode="after")
    def _own_bucket_is_no_source(self) -> Settings:
        # Every tenant's uploads and artifacts live in the service's bucket: as an s3:// source it would
        # let one tenant compress, and download, another's files.
        if self.storage_backend == "s3" and self.s3_bucket in self.allowed_source_buckets:
            raise ValueError(f"allowed_source_buckets must not include the service's own bucket {self.s3_bucket!r}")
        return self

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'modelpress.db').resolve()}"

    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    def broker_folder(self) -> Path:
        return (self.data_dir / "broker").resolve()

    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.data_dir / "storage").resolve()

    def resolved_work_dir(self) -> Path:
        return (self.work_dir or self.data_dir / "work").resolve()

    def resolved_signing_secret(self) -> str:
        return self.signing_secret or self._data_dir_key("signing.key", lambda: secrets.token_urlsafe(32))

    def resolved_encryption_keys(self) -> list[str]:
        keys = [key.strip() for key in self.encryption_keys.split(",") if key.strip()]
        if keys:
            return keys
        # 32 random bytes, urlsafe base64: the Fernet key format.
        return [self._data_dir_key("encryption.key", lambda: base64.urlsafe_b64encode(os.urandom(32)).decode())]

    def _data_dir_key(self, name: str, make: Callable[[], str]) -> str:
        """Embedded mode: one key file per data directory, shared by the API and worker processes."""
        path = self.data_dir / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written whole to a private file, then linked into place: os.link never replaces, so two
            # processes starting together agree on one key, and nobody reads a half-written one.
            draft = path.with_name(f".{name}.{os.getpid()}.draft")
            with os.fdopen(os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
                handle.write(make())
            try:
                os.link(draft, path)
            except FileExistsError:
                pass
            finally:
                draft.unlink(missing_ok=True)
        return path.read_text().strip()


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (tests clear the cache after changing the environment)."""
    return Settings()
