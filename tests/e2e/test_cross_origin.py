"""A web product on another origin integrates in a real browser (SELFCASCADE_CORS_ORIGINS): its
page, served by a second loopback HTTP server, creates a job with its API key, reads the 202's
Location, follows the job (polling, and the event stream read with fetch: an EventSource cannot
send the key) and downloads the image. A page on an origin not listed gets nothing."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from contract.keys import RedisKeys
from tests.conftest import free_port
from tests.running_stack import RunningStack, running_stack, write_tiny_model

pytestmark = pytest.mark.integration

KEY = "sk-cross-origin-0123456789"
BODY = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 2}

# The product's own page: plain fetch() calls, as any web front end makes them.
PAGE = """<!doctype html>
<title>another product</title>
<script>
const auth = (key) => ({ Authorization: `Bearer ${key}` });

async function create(api, key, body) {
  const response = await fetch(`${api}/v1/generations`, {
    method: "POST",
    headers: { ...auth(key), "Content-Type": "application/json", "Idempotency-Key": "page-1" },
    body: JSON.stringify(body),
  });
  return { status: response.status, location: response.headers.get("Location"),
           requestId: response.headers.get("X-Request-ID"), job: await response.json() };
}

async function poll(key, location) {
  for (;;) {
    const job = await (await fetch(location, { headers: auth(key) })).json();
    if (["succeeded", "failed", "canceled"].includes(job.status)) return job;
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

// Server-sent events with a key: fetch and a ReadableStream, read until the server ends it.
async function streamedEvents(key, location) {
  const response = await fetch(`${location}/events`, { headers: auth(key) });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    text += value;
  }
  return [...text.matchAll(/^event: (.+)$/gm)].map((match) => match[1]);
}

async function download(key, url) {
  const response = await fetch(url, { headers: auth(key) });
  const blob = await response.blob();
  return { status: response.status, type: blob.type, bytes: blob.size,
           etag: response.headers.get("ETag") };
}

async function integrate(api, key, body) {
  const created = await create(api, key, body);
  const [job, events] = await Promise.all([
    poll(key, created.location), streamedEvents(key, created.location),
  ]);
  return { created, job, events, output: await download(key, job.outputs[0].url) };
}

async function attempt(call) {
  try {
    await call();
    return "answered";
  } catch (error) {
    return `${error.name}: ${error.message}`;
  }
}
</script>
"""


@dataclass
class PageServer:
    """A static site on a loopback port of its own: an origin other than the API's."""

    root: Path
    port: int

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> PageServer:
        (self.root / "index.html").write_text(PAGE, encoding="utf-8")
        handler = partial(QuietHandler, directory=str(self.root))
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PageServer, PageServer]]:
    """The product's site, listed in the API's origins, and a site that is not."""
    with (
        PageServer(tmp_path_factory.mktemp("listed"), free_port()) as listed,
        PageServer(tmp_path_factory.mktemp("unlisted"), free_port()) as unlisted,
    ):
        yield listed, unlisted


@pytest.fixture(scope="module")
def stack(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory,
    sites: tuple[PageServer, PageServer],
) -> Iterator[RunningStack]:
    folder = tmp_path_factory.mktemp("cross-origin")
    with running_stack(
        redis_url, folder / "data", write_tiny_model(folder), "cross-origin-1",
        cors_origins=[sites[0].origin], auth_mode="keys", api_keys=f"web:{KEY}",
    ) as running:
        yield running


def test_a_page_on_a_listed_origin_creates_follows_and_downloads_a_job(
    open_page: Callable[[str], Any], stack: RunningStack, sites: tuple[PageServer, PageServer],
) -> None:
    page = open_page(sites[0].origin + "/")
    assert stack.url != sites[0].origin
    result = page.evaluate("([api, key, body]) => integrate(api, key, body)",
                           [stack.url, KEY, BODY])
    created, job = result["created"], result["job"]
    assert created["status"] == 202, created
    # Absolute: the page follows it as it is (a relative one would resolve against the page).
    assert created["location"] == f"{stack.url}/v1/generations/{created['job']['id']}"
    assert created["requestId"]
    assert job["status"] == "succeeded", (job, stack.worker.log()[-3000:])
    assert result["events"][0] == "queued" and result["events"][-1] == "succeeded"
    output = result["output"]
    assert output["status"] == 200 and output["type"] == "image/png"
    assert output["bytes"] == job["outputs"][0]["bytes"]
    assert output["etag"] == f'"{job["outputs"][0]["sha256"]}"'


def test_a_page_on_an_origin_not_listed_is_refused_by_the_browser(
    open_page: Callable[[str], Any], stack: RunningStack, sites: tuple[PageServer, PageServer],
) -> None:
    page = open_page(sites[1].origin + "/")
    redis = Redis.from_url(stack.settings.redis_url or "")
    jobs = f"{RedisKeys(stack.settings.redis_prefix).job('*')}"
    before = len(redis.keys(jobs))
    try:
        # With its key the POST needs a preflight, which fails: the request is never sent.
        refused = page.evaluate("([api, key, body]) => attempt(() => create(api, key, body))",
                                [stack.url, KEY, BODY])
        assert refused == "TypeError: Failed to fetch"
        assert len(redis.keys(jobs)) == before
        # A request needing no preflight is sent and answered, but withheld from the page.
        withheld = page.evaluate("(api) => attempt(() => fetch(`${api}/healthz`))", stack.url)
        assert withheld == "TypeError: Failed to fetch"
    finally:
        redis.close()
