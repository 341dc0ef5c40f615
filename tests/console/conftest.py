"""One embedded stack (uvicorn API + a real Celery worker) and one headless Chromium per test module."""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import cast

import pytest

from tests.e2e.conftest import Stack, _start_stack

CHROMIUM = os.environ.get("CONSOLE_CHROMIUM", "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "console"


@pytest.fixture(scope="module")
def console_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """What `make dev` runs: SQLite, local storage, the file-system broker, and one job worker."""
    from tests.conftest import service_env

    tmp = tmp_path_factory.mktemp("console")
    stack_gen = cast(Generator[Stack, None, None], _start_stack(tmp, service_env(tmp, stack="embedded")))
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


def screenshot(page: object, name: str, *, full_page: bool = False) -> None:
    """Write docs/console/<name>.png when CONSOLE_SCREENSHOTS=1 (the pictures in docs/console.md)."""
    if os.environ.get("CONSOLE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)  # type: ignore[attr-defined]
