"""The FastAPI application: routers, problem+json errors, start-up."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import health
from app.artifacts.router import router as storage_router
from app.auth.router import admin_router
from app.auth.router import router as keys_router
from app.auth.service import ensure_bootstrap_key
from app.body_limit import BodyLimitMiddleware
from app.config import get_settings
from app.console.router import install_console
from app.db import session_scope
from app.deps import RequestPath
from app.errors import document_problems, install_error_handlers
from app.jobs.router import router as jobs_router
from app.observability import http as observability
from app.observability.logs import configure_logging
from app.uploads.router import router as uploads_router
from app.webhooks.router import router as webhooks_router  # also registers the outbox listener


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    if settings.bootstrap_api_key:
        if settings.environment == "production":
            raise RuntimeError("MODELPRESS_BOOTSTRAP_API_KEY must not be set in production")
        with session_scope() as session:
            ensure_bootstrap_key(session, settings.bootstrap_api_key)
    app.state.request_path = RequestPath.open(settings)
    if app.state.serving:
        tune_gc_for_serving()
    try:
        yield
    finally:
        await app.state.request_path.close()


def tune_gc_for_serving() -> None:
    """A long-lived server's garbage collector: what start-up made (modules, routes, settings: ~140 000
    objects) is frozen out of every later collection, and the youngest generation is collected every 50 000
    allocations instead of 700. Without it, the full collections that now and then walked all of that were
    the slow tail of the API's latency: p99 of ``GET /v1/jobs/{id}`` at 32 connections was 150-180 ms without
    this and 66-100 ms with it (docs/BENCHMARKS.md). Memory is freed by reference counting as before; only
    cycles wait longer."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def create_app(*, serving: bool = False) -> FastAPI:
    """The API. ``serving``: this process serves it until it exits (``modelpress serve``), so the garbage
    collector is tuned for that at start-up (:func:`tune_gc_for_serving`); tests build apps without it."""
    settings = get_settings()
    configure_logging(settings, "api")
    app = FastAPI(
        title="ModelPress",
        version="1.0.0",
        summary="Compression-as-a-service for causal language models",
        lifespan=lifespan,
    )
    app.state.serving = serving
    install_error_handlers(app)
    document_problems(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    observability.install(app, settings)
    app.include_router(health.router)
    app.include_router(jobs_router)
    app.include_router(uploads_router)
    app.include_router(webhooks_router)
    app.include_router(storage_router)
    app.include_router(keys_router)
    app.include_router(admin_router)
    install_console(app)
    return app


app = create_app()


def serving_app() -> FastAPI:
    """The app as ``modelpress serve`` runs it (a uvicorn factory: ``app.main:serving_app``)."""
    return create_app(serving=True)
