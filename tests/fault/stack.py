"""The fault suite's stack: the production topology on loopback with a cuttable TCP proxy in front of Postgres,
Redis and the S3 server.

Every ModelPress process (API, one job worker, the maintenance worker) and this test process reach the
servers only through the proxies, so ``stack.proxies["postgres"].cut()`` is an outage for all of them.

Knobs (environment): ``MODELPRESS_FAULT_JOBS`` jobs in the queue (default 3) and ``MODELPRESS_FAULT_OUTAGE_S``
seconds each outage lasts at least (default 10): small enough for ``make test`` on two loaded cores, where one
tiny job takes up to a minute. Issue 16's acceptance run is ``MODELPRESS_FAULT_JOBS=20 MODELPRESS_FAULT_OUTAGE_S=30``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.fault.tcpproxy import TcpProxy
from tests.helpers import Stack

FAULT_JOBS = int(os.environ.get("MODELPRESS_FAULT_JOBS", "3"))
OUTAGE_S = float(os.environ.get("MODELPRESS_FAULT_OUTAGE_S", "10"))


def via(url: str, proxy: TcpProxy) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{proxy.port}" if userinfo else f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class FaultStack:
    """The running stack, the proxy in front of each server (by name), and the job worker's scratch space."""

    stack: Stack
    proxies: dict[str, TcpProxy]
    work_dir: Path
