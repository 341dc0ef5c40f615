"""A request whose database connection dies after its last query still gets its answer.

Found by the Postgres outage scenario: a GET had sent its 200 when the outage began, and the request
session's closing ROLLBACK raised on the dead connection, so the server dropped the response mid-way
("Caught handled exception, but response already started"; the client saw "Server disconnected").
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy import text

from tests.fault.tcpproxy import TcpProxy
from tests.helpers import PG_URL, apply_env

pytestmark = pytest.mark.fault


@pytest.fixture
def proxied_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pg_migrated: None) -> Iterator[TcpProxy]:
    url = urlsplit(PG_URL)
    with TcpProxy(url.port or 5432, url.hostname or "127.0.0.1") as proxy:
        proxied = urlunsplit(url._replace(netloc=f"{url.username}@127.0.0.1:{proxy.port}"))
        apply_env(monkeypatch, {"MODELPRESS_DATABASE_URL": proxied, "MODELPRESS_DATA_DIR": str(tmp_path)})
        yield proxy
    from app.db import reset_caches

    reset_caches()


def test_the_request_session_closes_quietly_after_the_database_went_away(proxied_database: TcpProxy) -> None:
    from app.db import get_engine
    from app.deps import get_session

    dependency = get_session()
    session = next(dependency)
    assert session.execute(text("SELECT 1")).scalar() == 1  # the request's work, in an open transaction
    proxied_database.cut()
    with pytest.raises(StopIteration):  # FastAPI finishing the dependency after the response
        next(dependency)
    proxied_database.restore()
    # The dead connection was not handed back to the pool as if it were fine: the next request works.
    with get_engine().connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
