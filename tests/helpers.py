"""What tests share, in one module: the service's test environment, callers with keys, uploads and jobs through
the API or the database, the whole stack as processes, a webhook receiver, and waiting on a condition.

Fixtures live in the ``conftest.py`` files and build on these; test files import from here, never from each
other or from a ``conftest.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from standardwebhooks import Webhook

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
BUCKET = "modelpress-test"
SOURCE_BUCKET = "customer-models"
MIB = 1024 * 1024
FINISHED = frozenset({"succeeded", "failed", "cancelled"})
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def eventually(check: Callable[[], T], timeout: float = 60, interval: float = 0.5) -> T:
    """``check()``'s result once its assertions hold, retried every ``interval`` seconds; after ``timeout``
    seconds its last AssertionError fails the test. For states another process (a worker, a server) reaches
    in its own time: a test waits for the state itself, never for an amount of time."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(interval)


def wait_until(
    check: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.05,
    *,
    ignoring: tuple[type[Exception], ...] = (),
    detail: Callable[[], str] | None = None,
) -> T:
    """``check()``'s first truthy result (see :func:`eventually`): None, False and an empty collection all
    mean "not yet", so ``wait_until(receiver.accepted, ...)`` waits for a delivery; so do the exceptions in
    ``ignoring`` (a server behind an outage). The failure names ``what`` and the last answer, then ``detail()``
    (a process's log, say)."""

    def reached() -> T:
        try:
            result = check()
        except ignoring as exc:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {exc!r}") from None
        assert result, f"timed out after {timeout:.0f} s waiting for {what}; last: {result!r}"
        return result

    try:
        return eventually(reached, timeout, interval)
    except AssertionError as exc:
        if detail is None:
            raise
        raise AssertionError(f"{exc}\n{detail()}") from None


class StopAfter:
    """A ``should_stop`` that answers yes from its ``n``-th question on, counting every question in ``asked``
    (a cancel that lands at a known point of an engine's run)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.asked = 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.asked >= self.n


# ---------------------------------------------------------------- the service's environment


def service_env(tmp_path: Path, *, stack: str, s3_endpoint: str | None = None) -> dict[str, str]:
    """Environment for ModelPress processes: ``production`` (Postgres, Redis, S3) or ``embedded``."""
    env = {
        "MODELPRESS_ENVIRONMENT": "test",
        "MODELPRESS_DATA_DIR": str(tmp_path / "var"),
        "MODELPRESS_SIGNING_SECRET": "test-signing-secret",
        "MODELPRESS_LEASE_S": "4",
        "MODELPRESS_HEARTBEAT_S": "1",
        "MODELPRESS_REAPER_INTERVAL_S": "1",
        "MODELPRESS_MAX_ATTEMPTS": "3",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    if stack == "production":
        assert s3_endpoint is not None
        env.update(
            {
                "MODELPRESS_DATABASE_URL": PG_URL,
                "MODELPRESS_BROKER_URL": REDIS_URL,
                "MODELPRESS_STORAGE_BACKEND": "s3",
                "MODELPRESS_S3_BUCKET": BUCKET,
                "MODELPRESS_S3_ENDPOINT_URL": s3_endpoint,
                "MODELPRESS_ALLOWED_SOURCE_BUCKETS": f'["{SOURCE_BUCKET}"]',
            }
        )
    return env


def reset_app_caches() -> None:
    """Drop every cached setting, engine, storage and broker: the next use reads the environment again."""
    from app.broker import get_celery
    from app.config import get_settings
    from app.db import reset_caches
    from app.storage import get_storage

    get_settings.cache_clear()
    reset_caches()
    get_storage.cache_clear()
    get_celery.cache_clear()


def apply_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Set ``env`` for this process (undone with ``monkeypatch``) and drop every cached setting, engine,
    storage and broker."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_app_caches()


def migrate_once(env: dict[str, str]) -> None:
    """Migrate the database ``env`` names, then leave this process's environment and caches as they were."""
    mp = pytest.MonkeyPatch()
    try:
        apply_env(mp, env)
        migrate()
    finally:
        mp.undo()
        reset_app_caches()


def migrate() -> None:
    """Migrate the configured database to the newest revision (a no-op where it already is)."""
    from app.cli import cmd_migrate

    cmd_migrate(None)  # type: ignore[arg-type]


def reset_postgres() -> None:
    """Drop everything in the test database (the migrations are under test too: they rebuild it)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def empty_postgres(url: str = PG_URL) -> None:
    """Empty every table of the test database but the migrations' own, and Redis: a test starts from nothing,
    on the schema the session migrated once."""
    import redis
    from sqlalchemy import create_engine, text

    redis.Redis.from_url(REDIS_URL).flushdb()
    engine = create_engine(url)
    with engine.begin() as conn:
        tables = conn.execute(
            text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'")
        ).scalars()
        names = ", ".join(f'"{name}"' for name in tables)
        if names:
            conn.execute(text(f"TRUNCATE {names} CASCADE"))
    engine.dispose()


# ---------------------------------------------------------------- callers, uploads and jobs


@dataclass
class Caller:
    tenant_id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def make_caller(name: str, scopes: list[str] | None = None) -> Caller:
    """A new tenant and an API key of it (default scopes unless ``scopes``), in the configured database."""
    from app.auth.service import create_key, create_tenant
    from app.db import session_scope

    with session_scope() as session:
        tenant = create_tenant(session, name)
        _, clear = create_key(session, tenant.id, "test", scopes)
        return Caller(tenant_id=tenant.id, key=clear)


def upload_files(client: httpx.Client, headers: dict[str, str], files: dict[str, bytes]) -> str:
    """Create an upload, PUT every file to its presigned URL over real HTTP, complete it; return its id.
    ``client`` is a TestClient or an ``httpx.Client`` on a running API (its own headers are sent too)."""
    body = {"files": [{"path": p, "size": len(d), "sha256": sha256_bytes(d)} for p, d in files.items()]}
    created = client.post("/v1/uploads", json=body, headers=headers)
    assert created.status_code == 201, created.text
    for target in created.json()["targets"]:
        put = httpx.put(target["url"], content=files[target["path"]], timeout=60)
        assert put.status_code == 200, put.text
    done = client.post(f"/v1/uploads/{created.json()['id']}/complete", headers=headers)
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "complete"
    return str(created.json()["id"])


def quantize_job(upload_id: str, **extra: object) -> dict[str, object]:
    return {"model": {"upload_id": upload_id}, "steps": [{"method": "quantize", "scheme": "w8a16"}], **extra}


def model_files(path: Path) -> dict[str, bytes]:
    """The files of a model folder (not recursive), by name."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def download_artifacts(client: httpx.Client, job_id: str, dest: Path) -> dict[str, Any]:
    """Download a job's artifacts into ``dest``, each checked against the listing's and the manifest's sha256;
    return the manifest."""
    listing = client.get(f"/v1/jobs/{job_id}/artifacts")
    assert listing.status_code == 200, listing.text
    for item in listing.json()["data"]:
        data = httpx.get(item["url"], timeout=60).content
        assert sha256_bytes(data) == item["sha256"], item["path"]
        target = dest / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    manifest: dict[str, Any] = json.loads((dest / "manifest.json").read_text())
    for entry in manifest["files"]:  # the manifest vouches for every file
        assert sha256_bytes((dest / entry["path"]).read_bytes()) == entry["sha256"]
    return manifest


def all_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """Every event of a job, oldest first (the API pages them 500 at a time)."""
    events: list[dict[str, Any]] = []
    while True:
        after = events[-1]["id"] if events else 0
        page = client.get(f"/v1/jobs/{job_id}/events", params={"after": after, "limit": 500})
        assert page.status_code == 200, page.text
        events += page.json()["data"]
        if not page.json()["has_more"]:
            return events


def assert_same_outputs(original_dir: Path, quantized_dir: Path) -> None:
    """The quantized model (compressed-tensors, reloaded by transformers) answers like the original."""
    import torch
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(original_dir)
    quantized = AutoModelForCausalLM.from_pretrained(quantized_dir)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = original(ids).logits, quantized(ids).logits
    assert torch.allclose(a, b, atol=0.05), (a - b).abs().max()
    assert quantized.config.quantization_config is not None


def register_upload(tenant_id: str, files: dict[str, bytes]) -> str:
    """Put files in storage and register a complete upload, as the uploads API would (no HTTP)."""
    from app.db import session_scope, utcnow
    from app.storage import get_storage
    from app.storage_keys import upload_key
    from app.uploads.models import Upload

    with session_scope() as session:
        upload = Upload(
            tenant_id=tenant_id,
            status="complete",
            files=[{"path": p, "size": len(d), "sha256": sha256_bytes(d)} for p, d in files.items()],
            total_bytes=sum(len(d) for d in files.values()),
            expires_at=utcnow() + timedelta(hours=1),
        )
        session.add(upload)
        session.flush()
        for path, data in files.items():
            get_storage().put_bytes(upload_key(tenant_id, upload.id, path), data)
        return upload.id


def submit_job(tenant_id: str, spec: dict[str, Any]) -> str:
    """Create a job as the API would (validated spec, events, outbox), without HTTP or a broker message."""
    from app.auth.service import Principal
    from app.config import get_settings
    from app.db import get_sessionmaker
    from app.jobs.service import create_job
    from app.jobs.spec import JobSpec

    principal = Principal(tenant_id=tenant_id, key_id="k", scopes=frozenset({"jobs:write"}))
    with get_sessionmaker()() as session:
        job, _ = create_job(session, principal, JobSpec.model_validate(spec), get_settings(), None)
        return job.id


def load_job(job_id: str) -> Any:
    """The job row as it is now (a fresh session)."""
    from app.db import get_sessionmaker
    from app.jobs.models import Job

    with get_sessionmaker()() as session:
        return session.get(Job, job_id)


def job_events(*job_ids: str) -> list[Any]:
    """The events of these jobs (``JobEvent`` rows), in the order they were recorded."""
    from sqlalchemy import select

    from app.db import get_sessionmaker
    from app.jobs.models import JobEvent

    with get_sessionmaker()() as session:
        query = select(JobEvent).where(JobEvent.job_id.in_(job_ids)).order_by(JobEvent.id)
        return list(session.execute(query).scalars())


def job_event_types(job_id: str) -> list[str]:
    """The types of a job's events, in the order they were recorded."""
    return [event.type for event in job_events(job_id)]


def gptq_pipeline_report(tmp_path: Path, *, hardware: str, measure_speed: bool) -> dict[str, Any]:
    """One W4A16 GPTQ job on a tiny model through :func:`workers.pipeline.run_pipeline`, with ``hardware`` as a
    job would set it; its report in report.json's form."""
    from tests.tiny import sample_text, write_model_dir
    from workers.compression.recipe import Recipe
    from workers.pipeline import PipelineInputs, run_pipeline

    write_model_dir(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(sample_text(30))
    recipe = Recipe.model_validate({"steps": [{"method": "quantize", "scheme": "w4a16", "algorithm": "gptq"}]})
    inputs = PipelineInputs(
        model_dir=tmp_path / "model",
        calibration_files=[tmp_path / "calib.txt"],
        measure_speed=measure_speed,
        hardware=hardware,
    )
    return run_pipeline(recipe, inputs, tmp_path / "out").model_dump(mode="json")


def start_dev(data_dir: Path, port: int, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``modelpress dev`` as a process in its own group, on ``port``, with its data under ``data_dir/var`` and
    its output in ``log``; the caller's MODELPRESS_* settings are left out, ``env`` adds some."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    clean |= {"MODELPRESS_DATA_DIR": str(data_dir / "var"), "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", "dev", "--port", str(port)],
            cwd=ROOT,
            env=clean,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


# ---------------------------------------------------------------- the whole stack as processes


@dataclass
class Stack:
    """A running API (uvicorn) and maintenance worker; job workers start on demand."""

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
        from app.cli import worker_argv

        log = (self.tmp / f"worker-{len(self.workers)}.log").open("wb")
        argv = worker_argv("cpu", hostname=f"w{len(self.workers)}@%h")
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

    def logs(self) -> str:
        """The tail of every process log, for a failure message."""
        names = [f"worker-{i}.log" for i in range(len(self.workers))] + ["maintenance.log", "api.log"]
        return "\n".join((self.tmp / name).read_text()[-3000:] for name in names if (self.tmp / name).exists())

    def wait_for(self, job_id: str, statuses: set[str] | frozenset[str], timeout: float = 240) -> dict[str, Any]:
        """The job once its status is one of ``statuses`` (polled through the API)."""
        with self.client() as client:

            def reached() -> dict[str, Any] | None:
                job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
                return job if job["status"] in statuses else None

            try:
                return wait_until(reached, timeout, f"job {job_id} to become one of {sorted(statuses)}", 0.3)
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {client.get(f'/v1/jobs/{job_id}').json()}\n{self.logs()}") from None


def _api_healthy(base_url: str) -> bool:
    try:
        return httpx.get(base_url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_stack(
    tmp: Path, env_overrides: dict[str, str], maintenance_env: dict[str, str] | None = None
) -> Iterator[Stack]:
    """Migrate, then run the API and the maintenance worker (reaper, webhook relay) as processes, as in a
    deployment; yield the :class:`Stack`, then stop every process it started."""
    from app.cli import maintenance_argv

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
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=(tmp / "api.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    stack = Stack(env=env, base_url=base, key=caller.key, tmp=tmp)
    maintenance = subprocess.Popen(
        maintenance_argv(hostname="maintenance@%h", schedule=tmp / "beat-schedule"),
        cwd=ROOT,
        env={**env, **(maintenance_env or {})},
        stdout=(tmp / "maintenance.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: api.poll() is not None or _api_healthy(base), 30, "the API to answer /healthz")
        assert api.poll() is None, (tmp / "api.log").read_text()
        yield stack
    finally:
        running = [proc for proc in [api, maintenance, *stack.workers] if proc.poll() is None]
        for proc in running:  # every process told first, so that they stop side by side
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in running:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        mp.undo()
        from app.db import reset_caches

        reset_caches()


# ---------------------------------------------------------------- a webhook receiver


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    answered: int

    @property
    def payload(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    """A real HTTP server; ``plan`` holds the answers to give (status, headers) before answering 200."""

    port: int
    requests: list[Received] = field(default_factory=list)
    plan: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    delay_s: float = 0.0
    trickle: str | None = None
    """``"body"``: headers at once, then the body a byte every 0.2 s; ``"headers"``: the status line
    and headers a byte every 0.2 s (each read beats the read timeout; the whole answer never comes)."""
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if receiver.trickle is not None:
                    with receiver._lock:
                        receiver.requests.append(Received({k.lower(): v for k, v in self.headers.items()}, body, 200))
                    self._trickle(receiver.trickle)
                    return
                if receiver.delay_s:  # a slow receiver (the stimulus under test, not a wait for a state)
                    threading.Event().wait(receiver.delay_s)
                with receiver._lock:
                    status, headers = receiver.plan.pop(0) if receiver.plan else (200, {})
                    receiver.requests.append(Received({k.lower(): v for k, v in self.headers.items()}, body, status))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def _trickle(self, mode: str) -> None:
                head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n"
                if mode == "body":
                    self.wfile.write(head + b"\r\n")
                    self.wfile.flush()
                    head = b""
                for byte in [head[i : i + 1] for i in range(len(head))] + [b"x"] * 100:
                    try:
                        self.wfile.write(byte)
                        self.wfile.flush()
                    except OSError:  # the relay gave up and closed the connection
                        return
                    threading.Event().wait(0.2)

            def log_message(self, *_args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def accepted(self) -> list[Received]:
        """What a deduplicating receiver processes: 2xx answers, first per webhook-id."""
        seen: set[str] = set()
        out = []
        for request in self.requests:
            if 200 <= request.answered < 300 and request.headers["webhook-id"] not in seen:
                seen.add(request.headers["webhook-id"])
                out.append(request)
        return out


def reap_with_sight() -> dict[str, int]:
    """One reaper pass that judges leases at once, as a maintenance process that has reached the database
    for long does (a fresh one first waits a lease period: :class:`workers.reaper.DatabaseSight`)."""
    from workers.reaper import DatabaseSight, reap_once

    class LongSight(DatabaseSight):
        def unbroken_s(self, max_gap_s: float) -> float:
            return 1e9  # about 30 years

    return reap_once(LongSight())


def verify(request: Received, secret: str) -> dict[str, Any]:
    """The delivery's payload, once its Standard Webhooks signature checks out with ``secret``."""
    return dict(Webhook(secret).verify(request.body, request.headers))
