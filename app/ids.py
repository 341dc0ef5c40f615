"""Time-ordered public identifiers: ``<prefix>_<12 hex ms timestamp><10 hex random>``.

Sorting by id is sorting by creation time, which makes cursor pagination a plain ``id < cursor``.
"""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(5)}"
