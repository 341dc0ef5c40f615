"""A gate for one job worker of ``tests/e2e/test_distill_resume.py``, loaded at interpreter start-up
(``PYTHONPATH``) when ``MODELPRESS_TEST_CHECKPOINT_GATE`` names a folder.

It holds the worker still at a known point instead of racing it: once the job's first checkpoint is complete
(its ``latest.json`` written, which the runner writes last), it writes ``<folder>/first-checkpoint`` (holding
that key), and every later checkpoint write blocks for good. Training waits on its checkpoint upload, so the
job stays ``running`` at exactly its second checkpoint until the test kills the worker: nothing can finish
the job first, however slow or fast the machine.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

_FOLDER = os.environ.get("MODELPRESS_TEST_CHECKPOINT_GATE")


def _gated(write: Callable[[Any, str, Any], None], marker: Path) -> Callable[[Any, str, Any], None]:
    def gated_write(storage: Any, key: str, payload: Any) -> None:
        if key.startswith("checkpoints/") and marker.exists():
            threading.Event().wait()  # held until the test kills this process
        write(storage, key, payload)
        if key.startswith("checkpoints/") and key.endswith("/latest.json"):
            marker.write_text(key)

    return gated_write


if _FOLDER:
    from app.storage import S3Storage

    _marker = Path(_FOLDER) / "first-checkpoint"
    S3Storage.put_file = _gated(S3Storage.put_file, _marker)  # type: ignore[method-assign]
    S3Storage.put_bytes = _gated(S3Storage.put_bytes, _marker)  # type: ignore[method-assign]
