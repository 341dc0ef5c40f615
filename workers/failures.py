"""How a job attempt can end badly, and which of those endings are the user's, the job's, or the infrastructure's.

- :class:`InputError` (and an engine's ``EngineError``): the user's to fix; the job fails ``invalid_input``.
- :class:`LeaseLost`: another party took the job; this worker stops without touching its state.
- An infrastructure failure (:func:`infrastructure_failure`: the database, broker or storage unreachable):
  nobody's fault and transient; the attempt is released and the job retried later, never failed for it.
- Anything else is a bug: the job fails ``internal_error`` with :func:`internal_reason`.
"""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError
from sqlalchemy.exc import SQLAlchemyError

from app.errors import unavailable_dependency
from app.storage import StorageError


class InputError(Exception):
    """A job input that cannot be used (missing, corrupt, too large): the user's to fix."""


class LeaseLost(Exception):  # noqa: N818
    """Another party took the job (the reaper re-queued it): stop without touching its state."""


class DependenciesUnavailable(Exception):  # noqa: N818
    """The worker's database or storage is unreachable before a job could be claimed: take it later."""

    def __init__(self, down: list[str]) -> None:
        super().__init__(f"unavailable: {', '.join(down)}")
        self.down = down


def infrastructure_failure(exc: BaseException) -> str | None:
    """The dependency (``database``, ``broker``, ``storage``) whose outage ``exc`` is, or None when it is none.

    One classification for the API's 503s and the workers' retries (:func:`app.errors.unavailable_dependency`):
    connection-level errors only, never an answer. A missing object (``NoSuchKey``) or a rejected
    statement (``IntegrityError``) is no outage.
    """
    return unavailable_dependency(exc)


def internal_reason(exc: BaseException) -> str:
    """What a tenant reads of an unexpected error: its type and message, except for database and
    storage errors, whose text can hold SQL, hosts, bucket names or paths (those stay in the log)."""
    if isinstance(exc, SQLAlchemyError | BotoCoreError | ClientError | StorageError):
        return f"{type(exc).__name__}: an internal service error; the operators' worker log has the details"
    return f"{type(exc).__name__}: {exc}"[:2000]
