"""One embedded stack (uvicorn API + a real Celery worker) and one headless Chromium per test module."""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import cast

import pytest

from tests.helpers import Stack, service_env, start_stack

CHROMIUM = os.environ.get("CONSOLE_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def console_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """What `make dev` runs: SQLite, local storage, the file-system broker, and one job worker."""
    tmp = tmp_path_factory.mktemp("console")
    stack_gen = cast(Generator[Stack, None, None], start_stack(tmp, service_env(tmp, stack="embedded")))
    stack = next(stack_gen)
    stack.start_worker()
    try:
        yield stack
    finally:
        stack_gen.close()  # runs the generator's cleanup: stops the API, the worker and the maintenance process


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's Chromium driven by Playwright (Playwright's own browser download needs the internet)."""
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip("chromium is not installed: apt-get update && apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            yield chromium
        finally:
            chromium.close()
