"""Liveness and readiness probes.

``/healthz`` is the API process's own liveness and checks nothing else. ``/readyz`` is readiness: the
database, broker and storage answer, and the maintenance process (reaper, webhook relay, sweeps) sent a
heartbeat within ``MODELPRESS_LIVENESS_STALE_S``. Without it no lease is reaped and no webhook leaves, so
the deployment is broken even though every request would still be answered. Job workers are reported
(role, queues, age) but do not gate readiness: without one the API still takes jobs, which wait in the
queue exactly as they would behind a busy worker, and an operator sees them missing here.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from app.broker import check_broker
from app.config import get_settings
from app.db import get_engine, session_scope
from app.errors import PROBLEM_JSON
from app.heartbeats.service import ROLE_MAINTENANCE, ProcessLiveness, liveness
from app.storage import get_storage

log = logging.getLogger("modelpress.health")
router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


def _check_database() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


def _processes() -> list[ProcessLiveness]:
    with session_scope() as session:
        return liveness(session, get_settings().liveness_stale_s)


@router.get("/readyz")
async def readyz() -> JSONResponse:
    """Database, broker and storage reachable and the maintenance process alive; 503 problem+json naming
    what is not. ``workers`` and ``maintenance`` list each known process's queues and heartbeat age."""
    checks = {"database": _check_database, "broker": check_broker, "storage": lambda: get_storage().check()}
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            await run_in_threadpool(check)
            results[name] = "ok"
        except Exception:
            # The probe is unauthenticated: name the dependency, keep hosts and credentials in the log.
            log.warning("readiness check %s failed", name, exc_info=True)
            results[name] = "unavailable"
    processes: list[ProcessLiveness] = []
    if results["database"] == "ok":
        try:
            processes = await run_in_threadpool(_processes)
        except Exception:
            log.warning("reading process heartbeats failed", exc_info=True)
            results["database"] = "unavailable"
    maintenance = [p for p in processes if p.role == ROLE_MAINTENANCE]
    workers = [p for p in processes if p.role != ROLE_MAINTENANCE]
    if results["database"] != "ok":
        results["maintenance"] = "unknown"
    else:
        results["maintenance"] = "ok" if any(p.alive for p in maintenance) else "unavailable"
    body: dict[str, Any] = {
        "checks": results,
        # Ages, roles and queues only: the probe is unauthenticated, host names stay out of it.
        "maintenance": [asdict(p) for p in maintenance],
        "workers": [asdict(p) for p in workers],
    }
    if all(v == "ok" for v in results.values()):
        return JSONResponse({"status": "ready", **body})
    failed = ", ".join(k for k, v in results.items() if v != "ok")
    problem = {
        "type": "https://modelpress.dev/problems/not-ready",
        "title": "Service Unavailable",
        "status": 503,
        "detail": f"not ready: {failed}",
        **body,
    }
    return JSONResponse(problem, status_code=503, media_type=PROBLEM_JSON)
