"""FastAPI dependencies, as ``Annotated`` aliases: sessions, the request path, the caller, storage, settings."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from app.auth.quotas import too_many
from app.auth.ratelimit import RateLimiter, check_rate, create_rate_limiter
from app.auth.service import Principal, authenticate
from app.config import Settings, get_settings
from app.db import create_request_engine, get_sessionmaker
from app.errors import Problem
from app.storage import Storage, get_storage

log = logging.getLogger("modelpress.api")


def get_session() -> Iterator[Session]:
    """A session per request; services decide when to commit."""
    session = get_sessionmaker()()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        try:
            session.close()
        except DBAPIError:
            # The database went away after the request's last query: the response may already be on its way,
            # and raising now would cut it off. The dead connection is invalidated, not returned to the pool.
            log.warning("closing the request's database session failed", exc_info=True)


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]


@dataclass(frozen=True)
class RequestPath:
    """What every API request uses before its route: the request engine (the caller's key, and the reads
    clients repeat: a job, the job list, events, event-stream polls) and the rate limiter. Both are asyncio,
    so authentication and the rate check run on the event loop with no thread-pool hop; one per app, opened
    and closed by its lifespan, since an asyncio connection belongs to the event loop that opened it."""

    engine: AsyncEngine
    limiter: RateLimiter

    @classmethod
    def open(cls, settings: Settings) -> RequestPath:
        engine = create_request_engine(settings.resolved_database_url(), settings.api_database_pool_size)
        return cls(engine, create_rate_limiter(settings))

    async def close(self) -> None:
        await self.limiter.aclose()
        await self.engine.dispose()


async def request_path(request: Request) -> RequestPath:
    # async: a sync dependency would cost a thread-pool hop.
    path: RequestPath = request.app.state.request_path
    return path


RequestPathDep = Annotated[RequestPath, Depends(request_path)]


async def current_principal(request: Request, path: RequestPathDep) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Problem(
            401, "Unauthorized", "send 'Authorization: Bearer <api key>'", headers={"WWW-Authenticate": "Bearer"}
        )
    principal = await authenticate(path.engine, token.strip())
    if principal is None:
        raise Problem(401, "Unauthorized", "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    # Counted per key after authentication: an unauthenticated flood costs a hash lookup, not a budget.
    decision = await check_rate(path.limiter, get_settings(), principal.key_id, principal.rate_limit_per_minute)
    if not decision.allowed:
        raise too_many(
            f"this API key may make {decision.limit} requests per minute",
            decision.retry_after_s,
            limit=decision.limit,
        )
    request.state.principal = principal
    return principal


def require(scope: str) -> Callable[[Principal], Awaitable[Principal]]:
    # async: a pure check, run on the event loop instead of one more hop through the thread pool.
    async def check(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if scope not in principal.scopes and "admin" not in principal.scopes:
            raise Problem(403, "Forbidden", f"this API key lacks the '{scope}' scope")
        return principal

    return check


JobsReader = Annotated[Principal, Depends(require("jobs:read"))]
JobsWriter = Annotated[Principal, Depends(require("jobs:write"))]
AnyPrincipal = Annotated[Principal, Depends(current_principal)]
KeysManager = Annotated[Principal, Depends(require("keys:manage"))]
Admin = Annotated[Principal, Depends(require("admin"))]
