"""The runner owns one job's life on a worker: wait for its dependencies, claim, run the attempt, finish.

:class:`JobRunner` handles one delivery of a job's message: the readiness gate, then the claim. A claimed
job becomes an :class:`Attempt`, which fetches the inputs (:mod:`workers.inputs`), runs the pipeline with
the callbacks of :mod:`workers.callbacks`, publishes the artifacts with the manifest last
(:mod:`workers.publish`), keeps training checkpoints (:mod:`workers.checkpoints`), and turns every
exception into an outcome (:mod:`workers.failures`): a failed job with a readable reason, a cancelled
one, or — for an outage of the database, broker or storage — a released attempt that is retried later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import quotas
from app.broker import enqueue_job
from app.config import Settings, get_settings
from app.db import session_scope
from app.jobs import lifecycle
from app.jobs.models import TERMINAL_STATUSES, Job, JobStatus
from app.jobs.spec import DistillJobStep, JobSpec
from app.storage import Storage, get_storage
from workers.callbacks import Heartbeat, JobCallbacks
from workers.checkpoints import CheckpointStore
from workers.compression.base import Callbacks, EngineError, StepCancelled
from workers.failures import (
    DependenciesUnavailable,
    InputError,
    LeaseLost,
    infrastructure_failure,
    internal_reason,
)
from workers.inputs import InputFetcher
from workers.publish import ArtifactPublisher
from workers.readiness import DependencyProbe, worker_probe
from workers.sweep import scratch_dir

log = logging.getLogger("modelpress.runner")

__all__ = ["Attempt", "InputError", "JobRunner", "LeaseLost", "internal_reason"]

T = TypeVar("T")


class JobRunner:
    """One delivery of a job's message: ``JobRunner(job_id).run()``.

    Raises :class:`DependenciesUnavailable` when the job could not even be claimed because the database
    or storage is down: the caller (the Celery task) hands the message back for later, so work that
    never started is not lost.
    """

    def __init__(
        self,
        job_id: str,
        settings: Settings | None = None,
        storage: Storage | None = None,
        probe: DependencyProbe | None = None,
    ) -> None:
        self.job_id = job_id
        self.settings = settings or get_settings()
        self.storage = storage or get_storage()
        self.probe = probe or worker_probe()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"

    def run(self) -> None:
        down = self.probe.wait_until_ready(self.settings.dependency_wait_s)
        if down:
            raise DependenciesUnavailable(down)
        try:
            attempt = self._claim()
        except Exception as exc:
            dependency = infrastructure_failure(exc)
            if dependency is None:
                raise
            self.probe.forget()
            raise DependenciesUnavailable([dependency]) from exc
        if attempt is not None:
            attempt.run()

    def _claim(self) -> Attempt | None:
        with session_scope() as session:
            if not lifecycle.claim(session, self.job_id, self.worker_id, self.settings.lease_s):
                self._defer_if_waiting(session)
                return None
            job = session.execute(select(Job).where(Job.id == self.job_id)).scalar_one()
            claimed = ClaimedJob(
                job_id=job.id,
                tenant_id=job.tenant_id,
                attempt=job.attempts,
                spec=job.spec,
                steps=list(job.steps),
                queue=job.queue,
            )
        return Attempt(claimed, self.settings, self.storage, self.worker_id, self.probe)

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


@dataclass(frozen=True)
class ClaimedJob:
    """What the claim read of the job's row: everything an attempt needs from the database up front."""

    job_id: str
    tenant_id: str
    attempt: int
    spec: dict[str, Any]
    steps: list[dict[str, Any]]
    queue: str


def infra_backoff_s(settings: Settings, infra_retries: int) -> float:
    """Delay before the ``infra_retries``-th retry after an outage: doubling from the first, capped."""
    return float(min(settings.infra_retry_max_backoff_s, settings.infra_retry_backoff_s * 2 ** (infra_retries - 1)))


class Attempt:
    """One claimed attempt of a job, from its inputs to its outcome and cleanup."""

    def __init__(
        self, claimed: ClaimedJob, settings: Settings, storage: Storage, worker_id: str, probe: DependencyProbe
    ) -> None:
        self.job_id = claimed.job_id
        self.tenant_id = claimed.tenant_id
        self.number = claimed.attempt
        self.spec_data = claimed.spec
        self.queue = claimed.queue
        self.settings = settings
        self.storage = storage
        self.worker_id = worker_id
        self.probe = probe
        self.work = scratch_dir(settings, self.job_id, self.number)
        self.heartbeat = Heartbeat(self.job_id, worker_id, settings)
        self.callbacks = JobCallbacks(self.job_id, self.tenant_id, worker_id, claimed.steps, self.heartbeat)
        self.inputs = InputFetcher(storage, settings, self.tenant_id)
        self.publisher = ArtifactPublisher(storage, self.tenant_id, self.job_id, self.number)
        self.checkpoints = CheckpointStore(storage, self.tenant_id, self.job_id, self.heartbeat.lost)
        self.published = False

    # ------------------------------------------------------------------ outcome

    def run(self) -> None:
        self.heartbeat.start()
        try:
            self._run_to_an_outcome()
        finally:
            self._clean_up()

    def _run_to_an_outcome(self) -> None:
        try:
            spec = JobSpec.model_validate(self.spec_data)
            manifest_key, summary, files = self.execute(spec)
            ok = self._with_database(
                lambda session: lifecycle.succeed(
                    session, self.job_id, self.worker_id, manifest_key, summary, {"artifacts": files}
                )
            )
            if ok:
                self.published = True
                self.publisher.drop_other_attempts()
            else:
                self._after_lost_race()
        except StepCancelled:
            self._with_database(lambda session: lifecycle.mark_cancelled(session, self.job_id, self.worker_id))
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
            dependency = infrastructure_failure(exc)
            if dependency is not None:
                self._release(dependency, exc)
            else:
                log.error("job %s failed:\n%s", self.job_id, traceback.format_exc())
                self._fail("internal_error", internal_reason(exc))

    def _with_database(self, write: Callable[[Session], T]) -> T | None:
        """Run ``write`` in a transaction; if the database is unreachable, wait for it (up to a lease) and try
        once more. None when it stays unreachable: the lease then expires and the reaper takes over."""
        try:
            with session_scope() as session:
                return write(session)
        except Exception as exc:
            if infrastructure_failure(exc) != "database":
                raise
        log.warning("job %s: database unreachable while recording an outcome; waiting for it", self.job_id)
        self.probe.forget()
        if self.probe.wait_until_ready(self.settings.lease_s, only=("database",)):
            log.error("job %s: database still unreachable; the reaper will re-queue the job", self.job_id)
            return None
        with session_scope() as session:
            return write(session)

    def _fail(self, error_type: str, message: str) -> None:
        def write(session: Session) -> None:
            if self.heartbeat.cancel_requested.is_set() and lifecycle.mark_cancelled(
                session, self.job_id, self.worker_id
            ):
                return
            lifecycle.fail(session, self.job_id, error_type, message, self.worker_id)

        self._with_database(write)

    def _release(self, dependency: str, exc: BaseException) -> None:
        """An outage, not a failure: put the job back in the queue and ring again after a back-off."""
        log.warning(
            "job %s: %s unavailable (%s: %s); releasing attempt %d for a retry",
            self.job_id,
            dependency,
            type(exc).__name__,
            exc,
            self.number,
        )
        self.probe.forget()

        def write(session: Session) -> tuple[int, int] | None:
            retries = lifecycle.release_for_retry(
                session, self.job_id, self.worker_id, dependency, self.settings.max_infra_retries
            )
            if retries is None:
                return None
            return retries, quotas.tenant_priority(session, self.tenant_id, self.settings)

        released = self._with_database(write)
        if released is None:
            return
        retries, priority = released
        countdown = infra_backoff_s(self.settings, retries)
        if not enqueue_job(self.job_id, self.queue, priority=priority, countdown=countdown):
            # The broker is down too: the maintenance beat rings the job as soon as it answers.
            self._with_database(lambda session: lifecycle.mark_unrung(session, self.job_id))

    def _after_lost_race(self) -> None:
        with session_scope() as session:
            status = session.execute(select(Job.status).where(Job.id == self.job_id)).scalar_one()
            if status == JobStatus.CANCELLING:
                lifecycle.mark_cancelled(session, self.job_id, self.worker_id)

    # ------------------------------------------------------------------ cleanup

    def _clean_up(self) -> None:
        """Every action on its own: one failing (storage down, database down) skips none of the others.
        What is left behind is the sweeps' (:mod:`workers.sweep`)."""
        actions: list[tuple[str, Callable[[], None]]] = [
            ("stop the heartbeat", self.heartbeat.stop),
            ("delete this attempt's unpublished artifacts", self._discard_unpublished),
            ("remove the scratch directory", self._remove_scratch),
            ("drop the checkpoints of the ended job", self._drop_checkpoints_if_ended),
        ]
        for what, action in actions:
            try:
                action()
            except Exception:
                log.warning("job %s: could not %s; the sweep will", self.job_id, what, exc_info=True)

    def _discard_unpublished(self) -> None:
        if not self.published:  # whatever this attempt uploaded is nobody's artifact
            self.publisher.discard()

    def _remove_scratch(self) -> None:
        # This attempt's directory only: a newer attempt of the job may be running on this host.
        shutil.rmtree(self.work, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.work.parent.rmdir()  # when no other attempt is left in it

    def _drop_checkpoints_if_ended(self) -> None:
        """Training checkpoints serve only a re-delivery of this job: delete them once the job is over
        (whoever ended it), keep them while it may still run again (lost lease, released, re-queued)."""
        with session_scope() as session:
            status = session.execute(select(Job.status).where(Job.id == self.job_id)).scalar_one()
        if status in TERMINAL_STATUSES:
            self.checkpoints.drop()

    # ------------------------------------------------------------------ the work

    def execute(self, spec: JobSpec) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
        """Fetch the inputs, run the pipeline, publish the artifacts: (manifest key, summary, files)."""
        from workers.pipeline import PipelineInputs, run_pipeline
        from workers.reporting import summary_from_report

        work = self.work
        shutil.rmtree(work, ignore_errors=True)
        self.callbacks.progress(0.0, "fetching inputs", force=True)
        inputs = PipelineInputs(
            model_dir=work / "input" / "model",
            max_model_bytes=self.settings.max_model_bytes,
            memory_budget_bytes=self.settings.max_model_memory_bytes,
            hardware=spec.hardware,
        )
        self.inputs.fetch(spec.model, inputs.model_dir, "model", self.settings.max_model_bytes)
        if spec.calibration:
            inputs.calibration_files = self.inputs.fetch(
                spec.calibration, work / "input" / "calibration", "calibration"
            )
        if spec.evaluation:
            inputs.evaluation_files = self.inputs.fetch(spec.evaluation, work / "input" / "evaluation", "evaluation")
        if spec.training:
            inputs.training_files = self.inputs.fetch(spec.training, work / "input" / "training", "training")
        for index, step in enumerate(spec.steps):
            source = step.student.source() if isinstance(step, DistillJobStep) else None
            if source is not None:
                inputs.student_dirs[index] = work / "input" / f"student-{index}"
                self.inputs.fetch(
                    source, inputs.student_dirs[index], f"steps.{index}.student", self.settings.max_model_bytes
                )
            if step.method == "distill":
                inputs.checkpoint_dirs[index] = self.checkpoints.restore(index, work / f"checkpoints-{index}")
        inputs.on_checkpoint = self.checkpoints.save

        callbacks = Callbacks(
            progress=lambda f, m: self.callbacks.progress(f, m),
            should_stop=self.callbacks.should_stop,
            metrics=self.callbacks.metrics,
        )
        out = work / "output"
        report = run_pipeline(spec.recipe(), inputs, out, callbacks, self.callbacks.on_step)
        callbacks.check()
        self.callbacks.progress(0.99, "uploading artifacts", force=True)
        manifest_key, files = self.publisher.publish(out)
        return manifest_key, summary_from_report(report), files
