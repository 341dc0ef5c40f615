"""The whole stack as separate processes: a uvicorn API and a real Celery worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from app.cli import maintenance_argv, worker_argv
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    env: dict[str, str]
    base_url: str
    key: str
    tmp: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=60)

    def start_worker(self, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"worker-{len(self.workers)}.log").open("wb")
        n = len(self.workers)
        argv = worker_argv("cpu", hostname=f"w{n}@%h")
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**self.env, **(extra_env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(proc)
        return proc

    def kill_worker(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker and its pool children: no chance to clean up."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def wait_for(self, job_id: str, statuses: set[str], timeout: float = 240) -> dict:  # type: ignore[type-arg]
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while time.monotonic() < deadline:
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in statuses:
                    return job  # type: ignore[no-any-return]
                time.sleep(0.3)
        names = [f"worker-{i}.log" for i in range(len(self.workers))] + ["maintenance.log"]
        logs = "\n".join((self.tmp / name).read_text()[-3000:] for name in names if (self.tmp / name).exists())
        raise AssertionError(f"job {job_id} did not reach {statuses}: {job}\n{logs}")


def _start_stack(
    tmp: Path, env_overrides: dict[str, str], maintenance_env: dict[str, str] | None = None
) -> Iterator[Stack]:
    from tests.app.conftest import make_caller
    from tests.conftest import apply_env, migrate

    port = free_port()
    env = {
        **os.environ,
        "MODELPRESS_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "PYTHONUNBUFFERED": "1",
        # Webhook receivers in these tests listen on loopback over plain http.
        "MODELPRESS_ALLOW_HTTP_URLS": "true",
        "MODELPRESS_URL_ALLOWLIST": '["127.0.0.1"]',
        **env_overrides,  # e.g. a public base URL that is a proxy in front of the API (tests/sdk)
    }
    mp = pytest.MonkeyPatch()
    apply_env(mp, {k: v for k, v in env.items() if k.startswith("MODELPRESS_")})
    migrate()
    caller = make_caller("e2e")
    api_log = (tmp / "api.log").open("wb")
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=api_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        raise AssertionError((tmp / "api.log").read_text())
    stack = Stack(env=env, base_url=base, key=caller.key, tmp=tmp)
    # The periodic tasks (reaper, webhook relay) run in their own worker, as in a deployment.
    maintenance = subprocess.Popen(
        maintenance_argv(hostname="maintenance@%h", schedule=tmp / "beat-schedule"),
        cwd=ROOT,
        env={**env, **(maintenance_env or {})},
        stdout=(tmp / "maintenance.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield stack
    finally:
        for proc in [api, maintenance, *stack.workers]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        mp.undo()
        from app.db import reset_caches

        reset_caches()


def clean_production_state() -> None:
    """Empty Redis and the tables, so a stack starts from nothing."""
    import redis
    from sqlalchemy import create_engine, text

    from tests.conftest import PG_URL, REDIS_URL

    redis.Redis.from_url(REDIS_URL).flushdb()
    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        exists = conn.execute(text("SELECT to_regclass('public.jobs')")).scalar()
        if exists:
            conn.execute(
                text(
                    "TRUNCATE tenants, api_keys, uploads, jobs, job_events, job_metadata, idempotency_keys, "
                    "webhook_endpoints, webhook_deliveries, webhook_attempts, worker_heartbeats CASCADE"
                )
            )
    engine.dispose()


@pytest.fixture
def production_stack(tmp_path: Path, s3_endpoint: str, pg_migrated: None) -> Iterator[Stack]:
    """API + worker against Postgres, Redis and the S3 server."""
    from tests.conftest import service_env

    clean_production_state()
    yield from _start_stack(tmp_path, service_env(tmp_path, stack="production", s3_endpoint=s3_endpoint))


@pytest.fixture
def embedded_stack_procs(tmp_path: Path) -> Iterator[Stack]:
    """API + worker in the embedded mode: SQLite, local storage, file-system broker (what `make dev` runs)."""
    from tests.conftest import service_env

    yield from _start_stack(tmp_path, service_env(tmp_path, stack="embedded"))
