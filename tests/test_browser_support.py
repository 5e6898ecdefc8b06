"""Fixtures of the browser tests (holds no tests): Debian's chromium driven by Playwright.

Loaded with ``pytest_plugins``. Playwright never downloads a browser here; it launches
the system's ``/usr/bin/chromium`` (``.ci/run`` installs it). When a test fails, every
page it had open is saved as a screenshot under ``artifacts/browser/``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright
from test_web_support import Client, Serve

CHROMIUM = Path("/usr/bin/chromium")
HAVE_CHROMIUM = CHROMIUM.exists()
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "browser"


@dataclass
class Site:
    """The app on a real server, and a browser tab on it."""

    client: Client
    context: BrowserContext
    page: Page

    def url(self, path: str) -> str:
        return str(self.client.make_url(path))


Open = Callable[..., Awaitable[Site]]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    report = yield
    item.stash.setdefault(FAILED, False)
    if report.failed:
        item.stash[FAILED] = True
    return report


FAILED = pytest.StashKey[bool]()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM:
        pytest.skip(f"{CHROMIUM} is missing: `apt-get install chromium` (.ci/run does)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def open_site(
    serve: Serve, browser: Browser, request: pytest.FixtureRequest
) -> AsyncIterator[Open]:
    """Start the app (with settings changes) and open a tab on it."""
    contexts: list[BrowserContext] = []

    async def start(javascript: bool = True, **changes: Any) -> Site:
        client = await serve(**changes)
        context = await browser.new_context(
            base_url=str(client.make_url("/")),
            java_script_enabled=javascript,
            accept_downloads=True,
        )
        context.set_default_timeout(20_000)
        contexts.append(context)
        return Site(client, context, await context.new_page())

    yield start
    if request.node.stash.get(FAILED, False):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^\w.-]+", "_", request.node.name)
        for i, page in enumerate(p for c in contexts for p in c.pages):
            with contextlib.suppress(Exception):
                await page.screenshot(path=ARTIFACTS / f"{name}-{i}.png", full_page=True)
    for context in contexts:
        await context.close()
