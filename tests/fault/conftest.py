"""The fault suite's fixture: :class:`tests.fault.stack.FaultStack` started for one test, proxies closed after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.fault.stack import FaultStack, via
from tests.fault.tcpproxy import TcpProxy
from tests.helpers import PG_URL, REDIS_URL, empty_postgres, service_env, start_stack


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
    env = service_env(tmp_path, stack="production", s3_endpoint=via(s3_endpoint, proxies["s3"]))
    env |= {
        "MODELPRESS_DATABASE_URL": via(PG_URL, proxies["postgres"]),
        "MODELPRESS_BROKER_URL": via(REDIS_URL, proxies["redis"]),
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
