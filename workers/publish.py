"""An attempt's artifacts: uploaded under the attempt's own prefix with ``manifest.json`` last (its
presence means "complete"), and deleted again when the attempt does not become the job's result."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from app.db import utcnow
from app.storage import Storage, StorageError, sha256_file
from app.storage_keys import MANIFEST, artifact_prefix

log = logging.getLogger("modelpress.runner")

MANIFEST_VERSION = 1


class ArtifactPublisher:
    """Writes and removes what one attempt of a job put in the bucket; never another attempt's files,
    except :meth:`drop_other_attempts` once this attempt's artifacts are the job's."""

    def __init__(self, storage: Storage, tenant_id: str, job_id: str, attempt: int) -> None:
        self.storage = storage
        self.job_id = job_id
        self.job_prefix = artifact_prefix(tenant_id, job_id)
        self.prefix = artifact_prefix(tenant_id, job_id, attempt)

    def publish(self, out: Path) -> tuple[str, list[dict[str, Any]]]:
        """Upload every file under ``out``, then the manifest. Returns the manifest's key and the file list."""
        files = []
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            relative = path.relative_to(out).as_posix()
            files.append({"path": relative, "size": path.stat().st_size, "sha256": sha256_file(path)})
            self.storage.put_file(self.prefix + relative, path)
        manifest = {
            "version": MANIFEST_VERSION,
            "job_id": self.job_id,
            "created_at": utcnow().isoformat(),
            "files": files,
        }
        self.storage.put_bytes(self.prefix + MANIFEST, json.dumps(manifest, indent=2).encode())
        return self.prefix + MANIFEST, files

    def discard(self) -> None:
        """Delete whatever this attempt uploaded (it is nobody's artifact). Raises :class:`StorageError`."""
        self.storage.delete_prefix(self.prefix)

    def drop_other_attempts(self) -> None:
        """Once this attempt's artifacts are the job's, delete what interrupted attempts left behind
        (best effort: the bucket sweep removes what is left)."""
        try:
            folders = {o.key[len(self.job_prefix) :].split("/", 1)[0] for o in self.storage.list(self.job_prefix)}
            mine = self.prefix[len(self.job_prefix) :].rstrip("/")
            for folder in sorted(folders - {mine}):
                self.storage.delete_prefix(f"{self.job_prefix}{folder}/")
        except StorageError:
            log.warning("job %s: could not delete the artifacts of earlier attempts", self.job_id, exc_info=True)
