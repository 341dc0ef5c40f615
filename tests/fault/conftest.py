"""The production topology on loopback with a cuttable TCP proxy in front of Postgres, Redis and the S3 server.

Every ModelPress process (API, one job worker, the maintenance worker) and this test process reach the
servers only through the proxies, so ``stack.proxies["postgres"].cut()`` is an outage for all of them.

Knobs (environment): ``MODELPRESS_FAULT_JOBS`` jobs in the queue (default 3) and ``MODELPRESS_FAULT_OUTAGE_S``
seconds each outage lasts at least (default 10): small enough for ``make test`` on two loaded cores, where one
tiny job takes up to a minute. Issue 16's acceptance run is ``MODELPRESS_FAULT_JOBS=20 MODELPRESS_FAULT_OUTAGE_S=30``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from tests.fault.tcpproxy import TcpProxy
from tests.helpers import PG_URL, REDIS_URL, Stack, empty_postgres, service_env, start_stack

FAULT_JOBS = int(os.environ.get("MODELPRESS_FAULT_JOBS", "3"))
OUTAGE_S = float(os.environ.get("MODELPRESS_FAULT_OUTAGE_S", "10"))


def _via(url: str, proxy: TcpProxy) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{proxy.port}" if userinfo else f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class FaultStack:
    stack: Stack
    proxies: dict[str, TcpProxy]
    work_dir: Path
    uploads: dict[str, str] = field(default_factory=dict)

    def upload(self, client: httpx.Client, files: dict[str, bytes]) -> str:
        body = {
            "files": [{"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for p, d in files.items()]
        }
        created = client.post("/v1/uploads", json=body)
        assert created.status_code == 201, created.text
        for target in created.json()["targets"]:
            httpx.put(target["url"], content=files[target["path"]], timeout=60).raise_for_status()
        done = client.post(f"/v1/uploads/{created.json()['id']}/complete")
        assert done.status_code == 200, done.text
        return str(created.json()["id"])


@pytest.fixture
def fault_stack(tmp_path: Path, s3_endpoint: str, pg_migrated: None) -> Iterator[FaultStack]:
    empty_postgres()
    pg = urlsplit(PG_URL)
    redis = urlsplit(REDIS_URL)
    s3 = urlsplit(s3_endpoint)
    proxies = {
        "postgres": TcpProxy(pg.port or 5432, pg.hostname or "127.0.0.1"),
        "redis": TcpProxy(redis.port or 6379, redis.hostname or "127.0.0.1"),
        "s3": TcpProxy(s3.port or 80, s3.hostname or "127.0.0.1"),
    }
    env = service_env(tmp_path, stack="production", s3_endpoint=_via(s3_endpoint, proxies["s3"]))
    env |= {
        "MODELPRESS_DATABASE_URL": _via(PG_URL, proxies["postgres"]),
        "MODELPRESS_BROKER_URL": _via(REDIS_URL, proxies["redis"]),
        "MODELPRESS_WEBHOOK_RELAY_INTERVAL_S": "0.5",
        "MODELPRESS_LIVENESS_INTERVAL_S": "1",
        "MODELPRESS_LIVENESS_STALE_S": "10",
    }
    try:
        with contextmanager(start_stack)(tmp_path, env) as stack:
            yield FaultStack(stack=stack, proxies=proxies, work_dir=tmp_path / "var" / "work")
    finally:
        for proxy in proxies.values():
            proxy.close()
