"""A running attempt's line to the database: the lease heartbeat, and the callbacks the pipeline calls
(progress, metrics, step states, "should I stop?"). Every write goes through :mod:`app.jobs.lifecycle`,
guarded by this worker's id, so a worker that lost the job records nothing more about it."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import select

from app.config import Settings
from app.db import session_scope, utcnow
from app.jobs import lifecycle
from app.jobs.models import Job, JobStatus
from workers.failures import LeaseLost

log = logging.getLogger("modelpress.runner")

# At most one per-step training metrics event a second (milestones always).
METRICS_INTERVAL_S = 1.0
# At most one progress write a second: events are for people, not a trace.
PROGRESS_INTERVAL_S = 1.0
# Between heartbeats, the job's row is read for a cancel request at most this often.
STATUS_CHECK_INTERVAL_S = 1.0


class Heartbeat(threading.Thread):
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

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join(timeout=5)


class JobCallbacks:
    """What the pipeline reports about one attempt, written to the job's row and event log."""

    def __init__(
        self, job_id: str, tenant_id: str, worker_id: str, steps: list[dict[str, Any]], heartbeat: Heartbeat
    ) -> None:
        self.job_id, self.tenant_id, self.worker_id = job_id, tenant_id, worker_id
        self.steps = [dict(step) for step in steps]
        self.heartbeat = heartbeat
        self.fraction, self.message = 0.0, ""
        self._last_progress = self._last_metrics = self._last_status_check = 0.0

    def should_stop(self) -> bool:
        """True once a cancel was requested; raises :class:`LeaseLost` once the job is no longer ours."""
        if self.heartbeat.lost.is_set():
            raise LeaseLost
        if self.heartbeat.cancel_requested.is_set():
            return True
        # Between heartbeats, look at the row directly (cheap: one indexed read) at most once a second.
        now = time.monotonic()
        if now - self._last_status_check >= STATUS_CHECK_INTERVAL_S:
            self._last_status_check = now
            with session_scope() as session:
                status = session.execute(select(Job.status).where(Job.id == self.job_id)).scalar_one()
            if status == JobStatus.CANCELLING:
                self.heartbeat.cancel_requested.set()
                return True
        return False

    def progress(self, fraction: float, message: str, data: dict[str, Any] | None = None, force: bool = False) -> None:
        self.fraction, self.message = fraction, message
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        with session_scope() as session:
            lifecycle.set_progress(session, self.job_id, self.worker_id, fraction, message, data)

    def metrics(self, data: dict[str, Any]) -> None:
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
        self.progress(self.fraction, self.message, data, force=True)

    def on_step(self, index: int, status: str, extra: dict[str, Any]) -> None:
        """A step moved to ``running``, ``succeeded``, ``failed`` or ``cancelled``: its row entry and event."""
        step = dict(self.steps[index])
        step["status"] = status
        now = utcnow().isoformat()
        if status == "running":
            step["started_at"] = now
        else:
            step["finished_at"] = now
            step.update(extra)
        self.steps[index] = step
        with session_scope() as session:
            # A worker that lost the job (lease taken over, job ended) records nothing more about it.
            if lifecycle.set_steps(session, self.job_id, self.worker_id, self.steps):
                lifecycle.record_event(
                    session, self.job_id, self.tenant_id, f"job.step.{status}", {"step": index, **extra}
                )
