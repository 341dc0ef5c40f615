"""FastAPI dependencies, as ``Annotated`` aliases: sessions, the caller, storage, settings."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.auth.quotas import too_many
from app.auth.ratelimit import check_rate
from app.auth.service import Principal, authenticate
from app.config import Settings, get_settings
from app.db import get_sessionmaker
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


def current_principal(request: Request, session: SessionDep) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Problem(
            401, "Unauthorized", "send 'Authorization: Bearer <api key>'", headers={"WWW-Authenticate": "Bearer"}
        )
    principal = authenticate(session, token.strip())
    if principal is None:
        raise Problem(401, "Unauthorized", "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    # Counted per key after authentication: an unauthenticated flood costs a hash lookup, not a budget.
    decision = check_rate(get_settings(), principal.key_id, principal.rate_limit_per_minute)
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
