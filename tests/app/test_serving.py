"""The app as ``modelpress serve`` runs it: the garbage collector tuned for a long-lived server (frozen
start-up objects, a higher young-generation threshold), and apps built by tests left as they were."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import ROOT

_PROBE = """
import gc, json
from fastapi.testclient import TestClient
from app.main import create_app, serving_app
before = gc.get_threshold()
with TestClient(create_app()):
    plain = (gc.get_threshold(), gc.get_freeze_count())
with TestClient(serving_app()):
    served = (gc.get_threshold(), gc.get_freeze_count())
print(json.dumps({"before": before, "plain": plain, "served": served}))
"""


def test_only_the_served_app_tunes_the_garbage_collector(embedded_stack: dict[str, str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["plain"] == [seen["before"], 0]
    threshold, frozen = seen["served"]
    assert threshold == [50_000, 20, 100] and frozen > 10_000
