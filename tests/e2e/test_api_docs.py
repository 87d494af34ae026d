"""The API's reference pages, /docs (Swagger UI) and /redoc, render in a real browser from the
API's own files: FastAPI's defaults load their scripts from a CDN, which a cluster without
internet access (and this test machine) cannot reach, leaving a blank page."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.running_stack import RunningStack

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("page_path", ["/docs", "/redoc"])
def test_the_reference_pages_load_nothing_from_elsewhere(
    stack: RunningStack, page_path: str
) -> None:
    html = httpx.get(stack.url + page_path, timeout=10).text
    scripts = [part.split('"')[1] for part in html.split("src=")[1:]]
    assert scripts, html
    assert all(src.startswith("/") for src in scripts), scripts  # this API's own paths
    for src in scripts:
        assert httpx.get(stack.url + src, timeout=10).status_code == 200, src


def test_swagger_ui_lists_the_generation_routes(
    open_page: Callable[[str], Any], stack: RunningStack
) -> None:
    docs = open_page(stack.url + "/docs")
    docs.wait_for_selector(".opblock-summary-path")
    paths = docs.eval_on_selector_all(
        ".opblock-summary-path", "nodes => nodes.map(n => n.textContent.trim())"
    )
    assert "/v1/generations" in paths and "/v1/generations/{job_id}" in paths, paths


def test_redoc_shows_the_api(open_page: Callable[[str], Any], stack: RunningStack) -> None:
    redoc = open_page(stack.url + "/redoc")
    redoc.wait_for_selector("h1:has-text('selfcascade')")
    redoc.wait_for_function("document.body.textContent.includes('/v1/generations/{job_id}')")
