"""Liveness and readiness probes."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from app.broker import check_broker
from app.db import get_engine
from app.errors import PROBLEM_JSON
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


@router.get("/readyz")
async def readyz() -> JSONResponse:
    """Database, broker and storage reachable; 503 problem+json naming what is not."""
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
    if all(v == "ok" for v in results.values()):
        return JSONResponse({"status": "ready", "checks": results})
    failed = ", ".join(k for k, v in results.items() if v != "ok")
    body = {
        "type": "https://modelpress.dev/problems/not-ready",
        "title": "Service Unavailable",
        "status": 503,
        "detail": f"not ready: {failed}",
        "checks": results,
    }
    return JSONResponse(body, status_code=503, media_type=PROBLEM_JSON)
