"""Every object-storage key ModelPress writes or reads, built here and nowhere else.

The bucket's layout (one service bucket, every tenant's objects under its id)::

    uploads/<tenant>/<upload>/<path>                         what a client PUT
    artifacts/<tenant>/<job>/attempt-<N>/<path>               one attempt's outputs, manifest.json last
    checkpoints/<tenant>/<job>/step-<i>/latest.json           the step's newest complete checkpoint …
    checkpoints/<tenant>/<job>/step-<i>/<version>/<path>      … and its files

Each attempt writes under its own ``attempt-N/``, so a worker that lost its lease can never delete or
overwrite what the attempt that succeeded published. Torch-free: the API, the workers and the sweeps
share it.
"""

from __future__ import annotations

import re

MANIFEST = "manifest.json"
CHECKPOINT_POINTER = "latest.json"
_ATTEMPT_FOLDER = re.compile(r"attempt-(\d+)")


def upload_key(tenant_id: str, upload_id: str, path: str = "") -> str:
    """The key of one file of an upload (``path`` empty: the upload's prefix)."""
    return f"uploads/{tenant_id}/{upload_id}/{path}"


def artifacts_root() -> str:
    """The prefix under which every job's artifacts live (what the bucket sweep walks)."""
    return "artifacts/"


def artifact_prefix(tenant_id: str, job_id: str, attempt: int | None = None) -> str:
    """A job's artifacts (``attempt`` None), or one attempt's."""
    job = f"{artifacts_root()}{tenant_id}/{job_id}/"
    return job if attempt is None else f"{job}{attempt_folder(attempt)}/"


def attempt_folder(attempt: int) -> str:
    """The folder name of an attempt, as used in artifact keys and worker scratch directories."""
    return f"attempt-{attempt}"


def parse_attempt_folder(name: str) -> int | None:
    """``attempt-3`` → 3; anything else → None (never guessed at)."""
    match = _ATTEMPT_FOLDER.fullmatch(name)
    return int(match.group(1)) if match else None


def manifest_key(tenant_id: str, job_id: str, attempt: int) -> str:
    """The manifest of an attempt: written last, its presence means the attempt's artifacts are complete."""
    return artifact_prefix(tenant_id, job_id, attempt) + MANIFEST


def checkpoints_root() -> str:
    """The prefix under which every job's training checkpoints live."""
    return "checkpoints/"


def checkpoint_prefix(tenant_id: str, job_id: str, step: int | None = None) -> str:
    """A job's checkpoints (``step`` None), or one step's."""
    job = f"{checkpoints_root()}{tenant_id}/{job_id}/"
    return job if step is None else f"{job}step-{step}/"


def job_of_key(key: str, root: str) -> tuple[str, str, str] | None:
    """``(tenant_id, job_id, rest)`` of a key under ``root`` (:func:`artifacts_root` or :func:`checkpoints_root`)."""
    if not key.startswith(root):
        return None
    parts = key[len(root) :].split("/", 2)
    if len(parts) < 3 or not parts[0] or not parts[1]:
        return None
    return parts[0], parts[1], parts[2]
