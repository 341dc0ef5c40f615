"""The job worker's readiness gate: no job is claimed while the database or the storage is unreachable.

The simplest design that loses nothing: a job message is acknowledged late and a job worker prefetches one,
so a worker that waits in :meth:`DependencyProbe.wait_until_ready` holding its message takes no other
message. If the outage outlasts ``dependency_wait_s`` the task hands the message back to the broker with
a delay (``Task.retry``), so a long outage costs one message round trip a minute per worker, not a
drained queue. A success is remembered for a few seconds, so back-to-back jobs cost no extra round trips.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from functools import lru_cache

from sqlalchemy import text

log = logging.getLogger("modelpress.worker")

Check = Callable[[], None]


def check_database() -> None:
    from app.db import get_engine

    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


def check_storage() -> None:
    from app.storage import get_storage

    get_storage().check()


class DependencyProbe:
    """Reachability of named dependencies, each a callable that raises when its dependency is down."""

    def __init__(
        self,
        checks: dict[str, Check],
        ok_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.checks = checks
        self.ok_ttl_s = ok_ttl_s
        self.clock = clock
        self.sleep = sleep
        self._ok_until = float("-inf")

    def down(self, only: Iterable[str] | None = None) -> list[str]:
        """The dependencies (all, or the ones named in ``only``) that do not answer now; empty: all do.
        A success of every check is cached for ``ok_ttl_s``."""
        if self.clock() < self._ok_until:
            return []
        names = list(self.checks) if only is None else [name for name in self.checks if name in set(only)]
        failed = []
        for name in names:
            try:
                self.checks[name]()
            except Exception as exc:
                log.warning("dependency %s unreachable: %s: %s", name, type(exc).__name__, exc)
                failed.append(name)
        if not failed and only is None:
            self._ok_until = self.clock() + self.ok_ttl_s
        return failed

    def forget(self) -> None:
        """Drop the cached success (a job just met an outage: the next look must be a real one)."""
        self._ok_until = float("-inf")

    def wait_until_ready(self, timeout_s: float, poll_s: float = 2.0, only: Iterable[str] | None = None) -> list[str]:
        """Block until the dependencies (all, or those in ``only``) answer or ``timeout_s`` passed; returns
        the ones still down (empty: ready)."""
        deadline = self.clock() + timeout_s
        down = self.down(only)
        while down and self.clock() < deadline:
            self.sleep(min(poll_s, max(deadline - self.clock(), 0.0)))
            down = self.down(only)
        return down


@lru_cache
def worker_probe() -> DependencyProbe:
    """The probe of this worker process: the database and the service's storage."""
    return DependencyProbe({"database": check_database, "storage": check_storage})
