"""Training checkpoints of a job's steps, kept in the bucket so that a re-delivered job resumes where the
interrupted attempt stopped. Each save is a new version; ``latest.json``, written last, points at the
newest complete one."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path

from app.ids import new_id
from app.storage import ObjectNotFoundError, Storage, sha256_file
from app.storage_keys import CHECKPOINT_POINTER, checkpoint_prefix
from workers.failures import LeaseLost

log = logging.getLogger("modelpress.runner")


class CheckpointStore:
    """One job's checkpoints. ``lease_lost`` is set once another attempt owns the job: from then on this
    one writes nothing, so it can never prune the new owner's versions."""

    def __init__(self, storage: Storage, tenant_id: str, job_id: str, lease_lost: threading.Event) -> None:
        self.storage = storage
        self.tenant_id = tenant_id
        self.job_id = job_id
        self.lease_lost = lease_lost

    def prefix(self, step: int | None = None) -> str:
        return checkpoint_prefix(self.tenant_id, self.job_id, step)

    def save(self, index: int, path: Path) -> None:
        """Upload a checkpoint as a new version, then point ``latest.json`` at it (last), then drop older ones.

        ``latest.json`` also keeps the directory's name (the engine's ``step-NNNNNNNN``): the engine finds
        checkpoints by that name, so a restore must recreate it.
        """
        if self.lease_lost.is_set():
            raise LeaseLost
        prefix = self.prefix(index)
        version = new_id("ckpt")
        files = []
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = file.relative_to(path).as_posix()
            self.storage.put_file(f"{prefix}{version}/{rel}", file)
            files.append({"path": rel, "size": file.stat().st_size, "sha256": sha256_file(file)})
        latest = {"version": version, "name": path.name, "files": files}
        self.storage.put_bytes(prefix + CHECKPOINT_POINTER, json.dumps(latest).encode())
        for obj in self.storage.list(prefix):
            if not obj.key.startswith(f"{prefix}{version}/") and not obj.key.endswith(CHECKPOINT_POINTER):
                self.storage.delete_prefix(obj.key)

    def restore(self, index: int, dest: Path) -> Path:
        """Download the latest complete checkpoint of a step (if any) into ``dest/<its name>``; return ``dest``.

        A checkpoint that is absent or incomplete means "start the step from scratch"; storage that cannot
        be reached is an outage (raised), never a reason to throw the training done so far away.
        """
        dest.mkdir(parents=True, exist_ok=True)
        prefix = self.prefix(index)
        try:
            latest = json.loads(self.storage.get_bytes(prefix + CHECKPOINT_POINTER))
        except ObjectNotFoundError:
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
            except ObjectNotFoundError:  # e.g. pruned by an attempt that had lost its lease
                intact = False
            if not intact:
                log.warning("checkpoint file %s missing or corrupt; step %d starts from scratch", record["path"], index)
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir(parents=True)
                return dest
        log.info("job %s step %d: resuming from checkpoint %s", self.job_id, index, latest["version"])
        return dest

    def drop(self) -> None:
        """Delete every checkpoint of the job (once it has ended). Raises :class:`~app.storage.StorageError`."""
        self.storage.delete_prefix(self.prefix())
