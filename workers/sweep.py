"""Scratch space of job attempts, and the sweeps that remove what no live attempt owns.

A worker's ``finally`` removes its attempt's scratch directory, unpublished artifacts and (once the job
ended) checkpoints; a SIGKILL, an out-of-memory kill or an outage during that cleanup leaves them behind.
Two sweeps catch those leftovers, deciding from the job's row alone:

- **scratch** (``<work_dir>/<job>/attempt-N``, on each worker host, so run by every job worker between
  jobs): a directory goes once its attempt cannot be running any more.
- **storage** (the bucket's ``artifacts/<tenant>/<job>/attempt-N/`` and ``checkpoints/<tenant>/<job>/``,
  run by the maintenance worker): the same rule for attempts, except that the published attempt (the one
  the job's manifest names) stays; checkpoints go once the job has ended.

The rule for an attempt N of a job whose row says ``attempts = A``: it is dead when the job is gone or
terminal, when N < A (a later attempt was claimed), or when N = A and the job is ``queued`` (released or
re-queued, nobody runs it). N > A is an attempt claimed after the row was read: never touched. So a live
attempt's files — the one whose number the row holds while the job is running or cancelling — are never
deleted, whichever host runs it.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from app.config import Settings, get_settings
from app.db import session_scope
from app.jobs.models import HOLDS_WORKER, TERMINAL_STATUSES, Job
from app.storage import Storage, StorageError
from app.storage_keys import (
    artifact_prefix,
    artifacts_root,
    attempt_folder,
    checkpoint_prefix,
    checkpoints_root,
    job_of_key,
    parse_attempt_folder,
)

log = logging.getLogger("modelpress.sweep")


def scratch_dir(settings: Settings, job_id: str, attempt: int) -> Path:
    """Where one attempt of a job works on this host: its downloads, checkpoints and outputs."""
    return settings.resolved_work_dir() / job_id / attempt_folder(attempt)


@dataclass(frozen=True)
class JobState:
    """What the sweeps need of a job's row."""

    status: str
    attempts: int
    published_attempt: int | None


def job_states(job_ids: Iterable[str]) -> dict[str, JobState]:
    """The rows of these jobs (absent: the job is gone)."""
    ids = sorted(set(job_ids))
    states: dict[str, JobState] = {}
    with session_scope() as session:
        for start in range(0, len(ids), 500):
            rows = session.execute(
                select(Job.id, Job.status, Job.attempts, Job.manifest_key).where(Job.id.in_(ids[start : start + 500]))
            ).all()
            for job_id, status, attempts, manifest_key in rows:
                published = None
                if manifest_key:
                    published = parse_attempt_folder(manifest_key.rsplit("/", 2)[-2])
                states[job_id] = JobState(status, attempts, published)
    return states


def attempt_is_dead(state: JobState | None, attempt: int) -> bool:
    """Whether attempt ``attempt`` of a job in ``state`` can no longer run (see the module's rule)."""
    if state is None or state.status in TERMINAL_STATUSES:
        return True
    if attempt > state.attempts:
        return False  # claimed after the row was read
    return attempt < state.attempts or state.status not in HOLDS_WORKER


def sweep_scratch(settings: Settings) -> list[Path]:
    """Remove this host's attempt directories that no live attempt owns; returns what was removed."""
    root = settings.resolved_work_dir()
    if not root.is_dir():
        return []
    found: dict[str, list[tuple[int, Path]]] = {}
    for job_dir in root.iterdir():
        if not job_dir.is_dir():
            continue
        for entry in job_dir.iterdir():
            attempt = parse_attempt_folder(entry.name)
            if attempt is not None and entry.is_dir():
                found.setdefault(job_dir.name, []).append((attempt, entry))
    if not found:
        return []
    states = job_states(found)
    removed = []
    for job_id, attempts in found.items():
        for attempt, path in attempts:
            if attempt_is_dead(states.get(job_id), attempt):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        with suppress(OSError):
            (root / job_id).rmdir()  # only when nothing is left in it
    if removed:
        log.info("scratch sweep removed %d attempt directories: %s", len(removed), [str(p) for p in removed])
    return removed


_last_scratch_sweep = float("-inf")


def sweep_scratch_between_jobs() -> None:
    """A job worker's periodic scratch sweep (at most every ``scratch_sweep_interval_s``); never raises."""
    global _last_scratch_sweep
    settings = get_settings()
    now = time.monotonic()
    if now - _last_scratch_sweep < settings.scratch_sweep_interval_s:
        return
    _last_scratch_sweep = now
    try:
        sweep_scratch(settings)
    except Exception:  # e.g. the database is down: the next sweep catches up
        log.warning("scratch sweep failed", exc_info=True)


@dataclass
class StorageSweep:
    """What one storage sweep removed."""

    attempts: list[str]
    checkpoints: list[str]


def sweep_storage(storage: Storage) -> StorageSweep:
    """Remove attempt artifacts and checkpoints that no live attempt owns (see the module's rule).

    Raises :class:`~app.storage.StorageError` when the bucket cannot be listed; one prefix that cannot
    be deleted is logged and left for the next sweep.
    """
    attempts: dict[tuple[str, str], set[int]] = {}
    for obj in storage.list(artifacts_root()):
        parsed = job_of_key(obj.key, artifacts_root())
        if parsed is None:
            continue
        tenant_id, job_id, rest = parsed
        attempt = parse_attempt_folder(rest.split("/", 1)[0])
        if attempt is not None:
            attempts.setdefault((tenant_id, job_id), set()).add(attempt)
    checkpointed: set[tuple[str, str]] = set()
    for obj in storage.list(checkpoints_root()):
        parsed = job_of_key(obj.key, checkpoints_root())
        if parsed is not None:
            checkpointed.add(parsed[:2])
    states = job_states([job_id for _, job_id in (*attempts, *checkpointed)])

    result = StorageSweep([], [])
    for (tenant_id, job_id), numbers in sorted(attempts.items()):
        state = states.get(job_id)
        for attempt in sorted(numbers):
            if state is not None and attempt == state.published_attempt:
                continue
            if attempt_is_dead(state, attempt):
                _delete(storage, artifact_prefix(tenant_id, job_id, attempt), result.attempts)
    for tenant_id, job_id in sorted(checkpointed):
        state = states.get(job_id)
        if state is None or state.status in TERMINAL_STATUSES:
            _delete(storage, checkpoint_prefix(tenant_id, job_id), result.checkpoints)
    if result.attempts or result.checkpoints:
        log.info("storage sweep removed %s", {"attempts": result.attempts, "checkpoints": result.checkpoints})
    return result


def _delete(storage: Storage, prefix: str, removed: list[str]) -> None:
    try:
        storage.delete_prefix(prefix)
        removed.append(prefix)
    except StorageError:
        log.warning("storage sweep could not delete %s; the next sweep tries again", prefix, exc_info=True)
