"""Database engine, sessions and the declarative base."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import JSON, DateTime, MetaData, create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import NullPool
from sqlalchemy.types import TypeDecorator

from app.config import get_settings
from modelpress.schemas import INT32_MAX as INT32_MAX
from modelpress.schemas import JSON_INT_MAX as JSON_INT_MAX

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


# The largest values the database's integer columns hold (Postgres INTEGER and BIGINT). Every integer a
# client sends that reaches a query is bounded in its schema by INT32_MAX or, for BIGINT columns, by
# JSON_INT_MAX: the wire's own bounds, imported above and re-exported here. Past them the driver raises
# (a 500), where the client deserves a 422 naming the field.
INT64_MAX = 2**63 - 1


def utcnow() -> datetime:
    return datetime.now(UTC)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the API read while a worker writes; foreign keys are off by default in SQLite.
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _connect_args(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"check_same_thread": False, "timeout": 30}
    # A short connect timeout: a database host that does not answer is an outage to report (503) or wait
    # out (workers), not a request that hangs for the operating system's TCP timeout.
    return {"connect_timeout": 5} if url.startswith("postgresql") else {}


def create_database_engine(url: str, *, pooled: bool = True) -> Engine:
    """An engine for ``url``. ``pooled=False`` opens a connection per use: for a background thread that must
    not share sockets with a forked child, nor keep a connection an outage broke."""
    if url.startswith("sqlite"):
        pool: dict[str, Any] = {} if pooled else {"poolclass": NullPool}
        engine = create_engine(url, connect_args=_connect_args(url), **pool)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if not pooled:
        return create_engine(url, poolclass=NullPool, connect_args=_connect_args(url))
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10, connect_args=_connect_args(url))


def create_request_engine(url: str, pool_size: int = 32) -> AsyncEngine:
    """The API's engine for its request path (the caller's key) and the reads clients repeat (a job, the job
    list, a job's events, every poll of an open event stream): asyncio, so a read costs no
    thread-pool hop; autocommit, so a single statement costs no BEGIN and ROLLBACK round trips; used with
    Core statements, not the ORM. No pre-ping either: a connection an outage broke fails its statement
    (a 503, and SQLAlchemy then invalidates the whole pool), where a ping would cost every request a
    round trip. One per app, made in its lifespan: an asyncio connection belongs to the event loop that
    opened it. ``pool_size`` is about the number of concurrent requests: each holds a connection only for
    its statements, but a burst past the pool opens overflow connections that are closed again after use
    (a connect costs far more than a read)."""
    target = make_url(url)
    if target.drivername.startswith("sqlite"):
        target = target.set(drivername="sqlite+aiosqlite")
        engine = create_async_engine(target, connect_args={"timeout": 30}, isolation_level="AUTOCOMMIT")
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        target,
        pool_size=pool_size,
        max_overflow=pool_size // 2,
        isolation_level="AUTOCOMMIT",
        connect_args=_connect_args(url),
    )


@lru_cache
def get_engine() -> Engine:
    return create_database_engine(get_settings().resolved_database_url())


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """One unit of work: commits on success, rolls back on error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def reset_caches() -> None:
    """Forget engine/session factories (tests that switch databases)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()
