"""The runner owns one job's life on a worker: claim, heartbeat, fetch inputs, run the pipeline,
upload artifacts with the manifest last, finish — and turns every exception into a readable failure."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.auth import quotas
from app.broker import enqueue_job
from app.config import Settings, get_settings
from app.db import session_scope, utcnow
from app.jobs import lifecycle
from app.jobs.models import Job, JobStatus
from app.jobs.service import artifact_prefix
from app.jobs.spec import DistillJobStep, JobSpec, Source
from app.storage import Storage, StorageError, get_storage, make_storage, sha256_file, split_s3_uri
from app.uploads.models import Upload
from app.uploads.service import upload_key
from workers.compression.base import Callbacks, EngineError, StepCancelled

log = logging.getLogger("modelpress.runner")

MANIFEST_VERSION = 1


def internal_reason(exc: BaseException) -> str:
    """What a tenant reads of an unexpected error: its type and message, except for database and
    storage errors, whose text can hold SQL, hosts, bucket names or paths (those stay in the log)."""
    if isinstance(exc, SQLAlchemyError | BotoCoreError | ClientError | StorageError):
        return f"{type(exc).__name__}: an internal service error; the operators' worker log has the details"
    return f"{type(exc).__name__}: {exc}"[:2000]


class InputError(Exception):
    """A job input that cannot be used (missing, corrupt, too large): the user's to fix."""


class LeaseLost(Exception):  # noqa: N818
    """Another party took the job (the reaper re-queued it): stop without touching its state."""


class _Heartbeat(threading.Thread):
    """Extends the lease every ``heartbeat_s`` and notices cancellation or a lost lease."""

    def __init__(self, job_id: str, worker_id: str, settings: Settings) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.job_id, self.worker_id, self.settings = job_id, worker_id, settings
        self.stopped = threading.Event()
        self.cancel_requested = threading.Event()
        self.lost = threading.Event()

    def beat(self) -> None:
        with session_scope() as session:
            status = lifecycle.heartbeat(session, self.job_id, self.worker_id, self.settings.lease_s)
        if status is None:
            self.lost.set()
        elif status == JobStatus.CANCELLING:
            self.cancel_requested.set()

    def run(self) -> None:
        while not self.stopped.wait(self.settings.heartbeat_s):
            try:
                self.beat()
            except Exception:  # a database blip must not kill the job; the lease has slack
                log.warning("heartbeat failed for %s", self.job_id, exc_info=True)


# At most one per-step training metrics event a second (milestones always).
METRICS_INTERVAL_S = 1.0


class JobRunner:
    def __init__(self, job_id: str, settings: Settings | None = None, storage: Storage | None = None) -> None:
        self.job_id = job_id
        self.settings = settings or get_settings()
        self.storage = storage or get_storage()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self._last_progress = self._last_metrics = 0.0
        self._fraction, self._message = 0.0, ""
        self._steps: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ life cycle

    def run(self) -> None:
        with session_scope() as session:
            if not lifecycle.claim(session, self.job_id, self.worker_id, self.settings.lease_s):
                self._defer_if_waiting(session)
                return
            job = session.execute(select(Job).where(Job.id == self.job_id)).scalar_one()
            tenant_id, spec_data, attempt, self._steps = job.tenant_id, job.spec, job.attempts, list(job.steps)
        self.tenant_id = tenant_id
        self.attempt = attempt
        published = False
        heartbeat = _Heartbeat(self.job_id, self.worker_id, self.settings)
        self.heartbeat = heartbeat
        heartbeat.start()
        work = self.settings.resolved_work_dir() / self.job_id / f"attempt-{attempt}"
        try:
            spec = JobSpec.model_validate(spec_data)
            manifest_key, summary, files = self._execute(spec, work)
            with session_scope() as session:
                ok = lifecycle.succeed(
                    session, self.job_id, self.worker_id, manifest_key, summary, {"artifacts": files}
                )
            if ok:
                published = True
                self._drop_other_attempts_artifacts()
            else:
                self._after_lost_race()
        except StepCancelled:
            with session_scope() as session:
                lifecycle.mark_cancelled(session, self.job_id, self.worker_id)
        except LeaseLost:
            log.warning("job %s: lease lost; leaving it to whoever holds it now", self.job_id)
        except (EngineError, InputError) as exc:
            self._fail("invalid_input", str(exc))
        except SoftTimeLimitExceeded:
            self._fail("time_limit", f"the job exceeded the time limit of {self.settings.job_time_limit_s} s")
        except MemoryError:
            self._fail(
                "out_of_memory", "the worker ran out of memory; try a smaller model or fewer calibration samples"
            )
        except Exception as exc:
            log.error("job %s failed:\n%s", self.job_id, traceback.format_exc())
            self._fail("internal_error", internal_reason(exc))
        finally:
            heartbeat.stopped.set()
            heartbeat.join(timeout=5)
            if not published:  # whatever this attempt uploaded is nobody's artifact
                with contextlib.suppress(StorageError):
                    self.storage.delete_prefix(artifact_prefix(self.tenant_id, self.job_id, attempt))
            # This attempt's directory only: a newer attempt of the job may be running on this host.
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(OSError):
                work.parent.rmdir()  # when no other attempt is left in it
            self._drop_checkpoints_if_ended()

    def _defer_if_waiting(self, session: Session) -> None:
        """A refused claim of a job still queued means its tenant runs as many jobs as its quota allows: ring
        again shortly (the row is committed, so an early doorbell is harmless; the reaper is the backstop)."""
        deferred = quotas.deferred_job(session, self.job_id, self.settings)
        if deferred is None:
            log.info("job %s not claimable (already taken, cancelled or finished)", self.job_id)
            return
        queue, priority = deferred
        lifecycle.mark_rung(session, self.job_id)
        log.info(
            "job %s waits for a running slot of its tenant; retrying in %s s",
            self.job_id,
            self.settings.quota_retry_after_s,
        )
        enqueue_job(self.job_id, queue, priority=priority, countdown=self.settings.quota_retry_after_s)

    def _fail(self, error_type: str, message: str) -> None:
        with session_scope() as session:
            if self.heartbeat.cancel_requested.is_set() and lifecycle.mark_cancelled(
                session, self.job_id, self.worker_id
            ):
                return
            lifecycle.fail(session, self.job_id, error_type, message, self.worker_id)

    def _after_lost_race(self) -> None:
        with session_scope() as session:
            status = session.execute(select(Job.status).where(Job.id == self.job_id)).scalar_one()
            if status == JobStatus.CANCELLING:
                lifecycle.mark_cancelled(session, self.job_id, self.worker_id)

    # ------------------------------------------------------------------ callbacks

    def _should_stop(self) -> bool:
        if self.heartbeat.lost.is_set():
            raise LeaseLost
        if self.heartbeat.cancel_requested.is_set():
            return True
        # Between heartbeats, look at the row directly (cheap: one indexed read) at most once a second.
        now = time.monotonic()
        if now - getattr(self, "_last_status_check", 0.0) >= 1.0:
            self._last_status_check = now
            with session_scope() as session:
                status = session.execute(select(Job.status).where(Job.id == self.job_id)).scalar_one()
            if status == JobStatus.CANCELLING:
                self.heartbeat.cancel_requested.set()
                return True
        return False

    def _progress(self, fraction: float, message: str, data: dict[str, Any] | None = None, force: bool = False) -> None:
        self._fraction, self._message = fraction, message
        now = time.monotonic()
        # At most one progress write a second: events are for people, not a trace.
        if not force and now - self._last_progress < 1.0:
            return
        self._last_progress = now
        with session_scope() as session:
            lifecycle.set_progress(session, self.job_id, self.worker_id, fraction, message, data)

    def _metrics(self, data: dict[str, Any]) -> None:
        """An engine's numbers, recorded as a ``job.progress`` event with the current message.

        Training loops report every step; those events are kept to one a second (steps on a GPU are
        much faster), except milestones: an evaluation, the first step after a resume. One-off
        numbers (no ``step``, e.g. a quantize step's summary) are always kept.
        """
        milestone = "step" not in data or "eval_perplexity" in data or "resumed_from_step" in data
        now = time.monotonic()
        if not milestone and now - self._last_metrics < METRICS_INTERVAL_S:
            return
        self._last_metrics = now
        self._progress(self._fraction, self._message, data, force=True)

    def _on_step(self, index: int, status: str, extra: dict[str, Any]) -> None:
        step = dict(self._steps[index])
        step["status"] = status
        now = utcnow().isoformat()
        if status == "running":
            step["started_at"] = now
        else:
            step["finished_at"] = now
            step.update(extra)
        self._steps[index] = step
        with session_scope() as session:
            # A worker that lost the job (lease taken over, job ended) records nothing more about it.
            if lifecycle.set_steps(session, self.job_id, self.worker_id, self._steps):
                lifecycle.record_event(
                    session, self.job_id, self.tenant_id, f"job.step.{status}", {"step": index, **extra}
                )

    # ------------------------------------------------------------------ inputs and outputs

    def _fetch(self, source: Source, dest: Path, field: str, max_bytes: int | None = None) -> list[Path]:
        """Download an input (upload or allow-listed s3:// prefix), verifying what we can; more than
        ``max_bytes`` in all is refused before anything is downloaded."""
        dest.mkdir(parents=True, exist_ok=True)
        if source.upload_id is not None:
            with session_scope() as session:
                upload = session.execute(
                    select(Upload).where(Upload.id == source.upload_id, Upload.tenant_id == self.tenant_id)
                ).scalar_one_or_none()
                if upload is None or upload.status != "complete":
                    raise InputError(f"{field}: upload {source.upload_id} is missing or incomplete")
                files = list(upload.files)
            _check_size(sum(f["size"] for f in files), field, max_bytes)
            paths = []
            for record in files:
                path = dest / record["path"]
                self.storage.get_file(upload_key(self.tenant_id, source.upload_id, record["path"]), path)
                if path.stat().st_size != record["size"] or sha256_file(path) != record["sha256"]:
                    raise InputError(f"{field}: {record['path']} does not match its sha256 (corrupted in storage)")
                paths.append(path)
            return paths
        assert source.uri is not None
        bucket, prefix = split_s3_uri(source.uri)
        if bucket not in self.settings.allowed_source_buckets:
            raise InputError(f"{field}: bucket {bucket!r} is not allowed")
        remote = make_storage(self.settings, bucket)
        objects = [o for o in remote.list(prefix) if not o.key.endswith("/")]
        if not objects:
            raise InputError(f"{field}: nothing found under {source.uri}")
        _check_size(sum(o.size for o in objects), field, max_bytes)
        paths = []
        for obj in objects:
            relative = obj.key[len(prefix) :].lstrip("/") or obj.key.rsplit("/", 1)[-1]
            if ".." in Path(relative).parts:
                raise InputError(f"{field}: unsafe object key {obj.key!r}")
            path = dest / relative
            remote.get_file(obj.key, path)
            if path.stat().st_size != obj.size:
                raise InputError(f"{field}: {obj.key} was truncated in transfer")
            paths.append(path)
        return paths

    def _upload_artifacts(self, out: Path) -> tuple[str, list[dict[str, Any]]]:
        """Upload every file under this attempt's prefix, then manifest.json last: the manifest's
        presence means 'complete'. Nothing of another attempt is touched."""
        prefix = artifact_prefix(self.tenant_id, self.job_id, self.attempt)
        files = []
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            relative = path.relative_to(out).as_posix()
            files.append({"path": relative, "size": path.stat().st_size, "sha256": sha256_file(path)})
            self.storage.put_file(prefix + relative, path)
        manifest = {
            "version": MANIFEST_VERSION,
            "job_id": self.job_id,
            "created_at": utcnow().isoformat(),
            "files": files,
        }
        self.storage.put_bytes(prefix + "manifest.json", json.dumps(manifest, indent=2).encode())
        return prefix + "manifest.json", files

    # ------------------------------------------------------------------ the work

    def _execute(self, spec: JobSpec, work: Path) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
        from workers.pipeline import PipelineInputs, run_pipeline
        from workers.reporting import summary_from_report

        shutil.rmtree(work, ignore_errors=True)
        self._progress(0.0, "fetching inputs", force=True)
        inputs = PipelineInputs(
            model_dir=work / "input" / "model",
            max_model_bytes=self.settings.max_model_bytes,
            hardware=spec.hardware,
        )
        self._fetch(spec.model, inputs.model_dir, "model", self.settings.max_model_bytes)
        if spec.calibration:
            inputs.calibration_files = self._fetch(spec.calibration, work / "input" / "calibration", "calibration")
        if spec.evaluation:
            inputs.evaluation_files = self._fetch(spec.evaluation, work / "input" / "evaluation", "evaluation")
        if spec.training:
            inputs.training_files = self._fetch(spec.training, work / "input" / "training", "training")
        for index, step in enumerate(spec.steps):
            source = step.student.source() if isinstance(step, DistillJobStep) else None
            if source is not None:
                inputs.student_dirs[index] = work / "input" / f"student-{index}"
                self._fetch(source, inputs.student_dirs[index], f"steps.{index}.student", self.settings.max_model_bytes)
            if step.method == "distill":
                inputs.checkpoint_dirs[index] = self._restore_checkpoint(index, work / f"checkpoints-{index}")
        inputs.on_checkpoint = self._save_checkpoint

        callbacks = Callbacks(
            progress=lambda f, m: self._progress(f, m),
            should_stop=self._should_stop,
            metrics=self._metrics,
        )
        out = work / "output"
        report = run_pipeline(spec.recipe(), inputs, out, callbacks, self._on_step)
        callbacks.check()
        self._progress(0.99, "uploading artifacts", force=True)
        manifest_key, files = self._upload_artifacts(out)
        return manifest_key, summary_from_report(report), files

    def _drop_other_attempts_artifacts(self) -> None:
        """Once this attempt's artifacts are the job's, delete what interrupted attempts left behind."""
        job_prefix = artifact_prefix(self.tenant_id, self.job_id)
        mine = artifact_prefix(self.tenant_id, self.job_id, self.attempt)
        try:
            others = {o.key[len(job_prefix) :].split("/", 1)[0] for o in self.storage.list(job_prefix)}
            for folder in sorted(others - {mine[len(job_prefix) :].rstrip("/")}):
                self.storage.delete_prefix(f"{job_prefix}{folder}/")
        except StorageError:
            log.warning("job %s: could not delete the artifacts of earlier attempts", self.job_id, exc_info=True)

    def _drop_checkpoints_if_ended(self) -> None:
        """Training checkpoints serve only a re-delivery of this job: delete them once the job is over
        (whoever ended it), keep them while it may still run again (lost lease, re-queued)."""
        try:
            with session_scope() as session:
                status = session.execute(select(Job.status).where(Job.id == self.job_id)).scalar_one()
            if status in ("succeeded", "failed", "cancelled"):
                self.storage.delete_prefix(f"checkpoints/{self.tenant_id}/{self.job_id}/")
        except StorageError:
            log.warning("job %s: could not delete its checkpoints", self.job_id, exc_info=True)

    def _checkpoint_prefix(self, index: int) -> str:
        return f"checkpoints/{self.tenant_id}/{self.job_id}/step-{index}/"

    def _save_checkpoint(self, index: int, path: Path) -> None:
        """Upload a checkpoint as a new version, then point ``latest.json`` at it (last), then drop older ones.

        ``latest.json`` also keeps the directory's name (the engine's ``step-NNNNNNNN``): the engine finds
        checkpoints by that name, so a restore must recreate it.
        """
        from app.ids import new_id

        if self.heartbeat.lost.is_set():  # a newer attempt owns the checkpoints now: do not prune its versions
            raise LeaseLost
        prefix = self._checkpoint_prefix(index)
        version = new_id("ckpt")
        files = []
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = file.relative_to(path).as_posix()
            self.storage.put_file(f"{prefix}{version}/{rel}", file)
            files.append({"path": rel, "size": file.stat().st_size, "sha256": sha256_file(file)})
        latest = {"version": version, "name": path.name, "files": files}
        self.storage.put_bytes(prefix + "latest.json", json.dumps(latest).encode())
        for obj in self.storage.list(prefix):
            if not obj.key.startswith(f"{prefix}{version}/") and not obj.key.endswith("latest.json"):
                self.storage.delete_prefix(obj.key)

    def _restore_checkpoint(self, index: int, dest: Path) -> Path:
        """Download the latest complete checkpoint of a step (if any) into ``dest/<its name>``; return ``dest``."""
        dest.mkdir(parents=True, exist_ok=True)
        prefix = self._checkpoint_prefix(index)
        try:
            latest = json.loads(self.storage.get_bytes(prefix + "latest.json"))
        except StorageError:
            return dest
        name = Path(str(latest.get("name", ""))).name  # a bare directory name, never a path
        if not name or name in {".", ".."}:
            log.warning("job %s step %d: checkpoint without a name; starting from scratch", self.job_id, index)
            return dest
        for record in latest["files"]:
            target = dest / name / record["path"]
            try:
                self.storage.get_file(f"{prefix}{latest['version']}/{record['path']}", target)
                intact = sha256_file(target) == record["sha256"]
            except StorageError:  # e.g. pruned by an attempt that had lost its lease
                intact = False
            if not intact:
                log.warning("checkpoint file %s missing or corrupt; step %d starts from scratch", record["path"], index)
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir(parents=True)
                return dest
        log.info("job %s step %d: resuming from checkpoint %s", self.job_id, index, latest["version"])
        return dest


def _check_size(total: int, field: str, max_bytes: int | None) -> None:
    if max_bytes is not None and total > max_bytes:
        raise InputError(f"{field}: {total} bytes exceeds the limit of {max_bytes} bytes")
