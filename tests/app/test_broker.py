"""The embedded broker never serves a half-written message (celery/kombu#1551)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection
from kombu.transport.virtual import Empty

from app.broker import EMBEDDED_TRANSPORT, WholeMessageFilesystemTransport, broker_url
from app.config import Settings


def _connection(folder: Path) -> Connection:
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder), "store_processed": False}
    return Connection(f"{EMBEDDED_TRANSPORT}://", transport_options=options)


def test_a_message_is_invisible_until_it_is_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen_while_writing: list[Any] = []
    looked: list[str] = []
    real_replace = os.replace

    def replace_after_a_look(src: str, dst: str) -> None:
        # The file is written but not yet renamed: a consumer polling now must find nothing to take.
        assert os.path.getsize(src) > 0
        with pytest.raises(Empty):
            seen_while_writing.append(channel._get("jobs"))
        looked.append(src)
        real_replace(src, dst)

    with _connection(tmp_path) as connection:
        channel = connection.default_channel
        assert isinstance(connection.transport, WholeMessageFilesystemTransport)
        monkeypatch.setattr(os, "replace", replace_after_a_look)
        channel._put("jobs", {"body": "ring"})
        monkeypatch.setattr(os, "replace", real_replace)
        assert len(looked) == 1 and seen_while_writing == []
        assert channel._get("jobs") == {"body": "ring"}
        assert [p.name for p in tmp_path.iterdir()] == []  # taken, and no temporary file left behind


def test_embedded_settings_use_the_whole_message_transport(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.resolved_broker_url().startswith("filesystem://")
    assert broker_url(settings).startswith(f"{EMBEDDED_TRANSPORT}://")
    assert broker_url(Settings(broker_url="redis://127.0.0.1:6379/0")) == "redis://127.0.0.1:6379/0"
