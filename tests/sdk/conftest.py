"""The client against the real stack: a uvicorn API (and, where a job must run, a real Celery worker)
behind a fault-injecting loopback proxy that every API call and every storage URL goes through."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from modelpress import ModelPress
from tests.helpers import MIB, Stack, service_env, start_stack
from tests.sdk.proxy import FaultProxy


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    proxy = FaultProxy()
    yield proxy
    proxy.close()


@pytest.fixture
def proxied_stack(tmp_path: Path, proxy: FaultProxy) -> Iterator[Stack]:
    """The embedded stack (SQLite, local storage, file broker: what `make dev` runs) whose signed storage
    URLs name the proxy; files above 1 MiB go up in 1 MiB parts. No job worker: tests start one if needed."""
    env = {
        **service_env(tmp_path, stack="embedded"),
        "MODELPRESS_PUBLIC_BASE_URL": proxy.url,
        "MODELPRESS_S3_MULTIPART_THRESHOLD_BYTES": str(MIB),
        "MODELPRESS_S3_MULTIPART_PART_BYTES": str(MIB),
    }
    for stack in start_stack(tmp_path, env):
        proxy.target_port = int(stack.base_url.rsplit(":", 1)[1])
        yield stack


@pytest.fixture
def mp(proxied_stack: Stack, proxy: FaultProxy) -> Iterator[ModelPress]:
    with ModelPress(api_key=proxied_stack.key, base_url=proxy.url, max_retries=3, backoff_s=0.05) as client:
        yield client
