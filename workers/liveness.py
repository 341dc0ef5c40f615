"""A worker bootstep that keeps this process's heartbeat row fresh (see :mod:`app.heartbeats.service`).

It runs in the worker's main process, in a thread of its own with a connection of its own per beat: the
main process stays up while pool children come and go, a thread never blocks the consumer's event loop,
and a fresh connection is never shared with a forked child nor left half-open by an outage. A failed beat
is logged (once per outage) and the next one tries again.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import bootsteps
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.broker import MAINTENANCE_QUEUE
from app.config import get_settings
from app.db import create_database_engine, utcnow
from app.heartbeats.service import ROLE_JOBS, ROLE_MAINTENANCE, forget, record_heartbeat

log = logging.getLogger("modelpress.worker.liveness")


class ProcessHeartbeat(bootsteps.StartStopStep):
    """Write ``worker_heartbeats`` every ``MODELPRESS_LIVENESS_INTERVAL_S``; delete the row on a clean stop."""

    label = "modelpress heartbeat"
    # After the pool has forked its children, and with the first beat made here, before the thread exists: a
    # child forked while the thread held a lock it then needs (a module being imported on first use, say)
    # would wait for it forever. Later forks (max_tasks_per_child) meet a thread that only re-runs code it has
    # already imported.
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._engine: Engine | None = None
        self._hostname = ""

    def start(self, parent: Any) -> None:
        settings = get_settings()
        queues = sorted(parent.app.amqp.queues.consume_from or parent.app.amqp.queues)
        self._hostname = parent.hostname
        self._engine = create_database_engine(settings.resolved_database_url(), pooled=False)
        role = ROLE_MAINTENANCE if MAINTENANCE_QUEUE in queues else ROLE_JOBS
        beat = {"hostname": self._hostname, "role": role, "queues": queues, "pid": os.getpid(), "started_at": utcnow()}
        interval_s = settings.liveness_interval_s
        failing = self._beat(beat, interval_s, failing=False)
        self._thread = threading.Thread(
            target=self._run, args=(beat, interval_s, failing), name="modelpress-heartbeat", daemon=True
        )
        self._thread.start()

    def _beat(self, beat: dict[str, Any], interval_s: float, *, failing: bool) -> bool:
        """Record one heartbeat; whether it failed (logged once per outage, not once per beat)."""
        try:
            with Session(self._engine) as session, session.begin():
                record_heartbeat(session, **beat)
        except Exception:
            if not failing:
                log.warning("could not record the heartbeat; retrying every %.0f s", interval_s, exc_info=True)
            return True
        if failing:
            log.info("heartbeat recorded again")
        return False

    def _run(self, beat: dict[str, Any], interval_s: float, failing: bool) -> None:
        while not self._stop.wait(interval_s):
            failing = self._beat(beat, interval_s, failing=failing)

    def stop(self, parent: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._engine is None:
            return
        try:
            with Session(self._engine) as session, session.begin():
                forget(session, self._hostname)
        except Exception:  # the row ages out instead; a stopping worker has nothing better to do
            log.warning("could not remove the heartbeat row of %s", self._hostname, exc_info=True)
        self._engine.dispose()
