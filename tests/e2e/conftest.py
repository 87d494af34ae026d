"""Browser tests: the system's headless chromium (never a downloaded one) driven by Playwright,
against a real stack (uvicorn, a worker subprocess with the tiny model, Redis).

Where chromium or Playwright is missing the tests skip and say exactly what to install.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.running_stack import RunningStack, running_stack, write_tiny_model

CHROMIUM = os.environ.get("SELFCASCADE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
INSTALL_HINT = "apt-get install -y chromium; .venv/bin/pip install -e '.[dev]'"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.skip(f"BROWSER TESTS SKIPPED: playwright is not installed ({exc}); {INSTALL_HINT}")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"BROWSER TESTS SKIPPED: no chromium at {CHROMIUM}; {INSTALL_HINT}")
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as exc:  # any launch failure is an environment problem: say which
            pytest.skip(f"BROWSER TESTS SKIPPED: {CHROMIUM} did not launch: {exc}")
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    folder = tmp_path_factory.mktemp("playground")
    with running_stack(
        redis_url, folder / "data", write_tiny_model(folder), "playground-1"
    ) as running:
        yield running


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[[str], Any]]:
    """Pages in a fresh browser context: its own storage, so galleries never leak between tests.
    Uncaught script errors fail the test."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    errors: list[str] = []

    def open_url(url: str) -> Any:
        opened = context.new_page()
        opened.set_default_timeout(20_000)
        opened.on("pageerror", lambda exc: errors.append(str(exc)))
        opened.goto(url)
        return opened

    yield open_url
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def with_model_list(page: Any) -> Any:
    """`page` once the playground shows its model: the model list fills the size presets, and
    everything after depends on it."""
    page.wait_for_function("document.querySelector('#model-info').textContent.includes('×')")
    return page


@pytest.fixture
def page(open_page: Callable[[str], Any], stack: RunningStack) -> Any:
    return with_model_list(open_page(stack.url + "/"))
