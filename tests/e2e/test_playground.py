"""The playground in a real browser: generate, watch progress, cancel, see errors."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlparse

import pytest
from pydantic import SecretStr

from service.app import create_app
from tests.conftest import free_port
from tests.e2e.conftest import with_model_list
from tests.live_stack import ApiServer
from tests.running_stack import RunningStack

pytestmark = pytest.mark.integration

SCREENSHOT = "/tmp/selfcascade-playground.png"
# Every label the stage line shows, recorded in the page as it changes.
RECORD_STAGE_LABELS = """
window.stageLabels = [];
new MutationObserver(() => {
  const text = document.querySelector('#stage-label').textContent;
  if (window.stageLabels.at(-1) !== text) window.stageLabels.push(text);
}).observe(document.querySelector('#stage-label'), {childList: true, characterData: true,
                                                    subtree: true});
"""


def status_is(page: Any, stack: RunningStack, status: str, timeout_s: float = 150) -> None:
    script = f"document.querySelector('#status').dataset.status === '{status}'"
    try:
        page.wait_for_function(script, timeout=timeout_s * 1000)
    except Exception as exc:
        shown = page.evaluate(
            "['#status', '#stage-label', '#error'].map(s => document.querySelector(s).innerText)"
        )
        log = stack.worker.log()[-3000:]
        raise AssertionError(f"page never showed {status!r} but {shown}; worker:\n{log}") from exc


# Every text the connection notice shows, recorded in the page as it changes.
RECORD_NOTICES = """
window.notices = [];
new MutationObserver(() => {
  const text = document.querySelector('#notice').textContent;
  if (text && window.notices.at(-1) !== text) window.notices.push(text);
}).observe(document.querySelector('#notice'), {childList: true, characterData: true,
                                               subtree: true});
"""


def api_error(code: str, message: str, param: str | None = None) -> str:
    """The API's one error body."""
    return json.dumps({"error": {"code": code, "message": message, "param": param}})


def is_job_status(url: str) -> bool:
    """GET /v1/generations/{id} and its /events stream: not the create, outputs or cancel."""
    parts = urlparse(url).path.split("/")  # ['', 'v1', 'generations', id, ...]
    return parts[1:3] == ["v1", "generations"] and (
        len(parts) == 4 or (len(parts) == 5 and parts[4] == "events")
    )


def wait_until(page: Any, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Waits on a condition kept in Python (route handlers run while the page waits)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        page.wait_for_timeout(100)


def generate_small(page: Any, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.click("label[for=preset-native]")
    page.fill("#seed", "3")
    page.fill("#steps", "3")
    page.click("#generate")


def test_presets_come_from_the_model(page: Any) -> None:
    assert page.is_hidden("#model-choice")  # one model: nothing to choose
    assert page.inner_text("label[for=preset-2x]").endswith("128×128")
    assert page.inner_text("label[for=preset-4x]").endswith("256×256")
    # The tiny model has no tuned upsamplers, so the switch is off and says why.
    assert page.is_disabled("#tuned")
    assert "none loaded" in page.inner_text("#tuned-hint")


def test_generation_reaches_100_percent_and_shows_the_image(page: Any, stack: RunningStack) -> None:
    page.evaluate(RECORD_STAGE_LABELS)
    page.fill("#prompt", "a red circle and a blue square")
    page.click("label[for=preset-2x]")
    page.fill("#seed", "7")
    page.fill("#steps", "4")
    page.click("#generate")
    status_is(page, stack, "succeeded")

    assert page.eval_on_selector("#progress", "p => p.value") == 100
    labels = page.evaluate("window.stageLabels")
    assert "stage 1/2: 64×64" in labels and "stage 2/2: 128×128" in labels, labels
    page.wait_for_function("document.querySelector('#result-image').complete")
    size = page.eval_on_selector("#result-image", "img => [img.naturalWidth, img.naturalHeight]")
    assert size == [128, 128]
    caption = page.inner_text("#caption")
    assert "seed 7" in caption and "UNet evaluations" in caption and "stage 2" in caption
    assert page.locator("#gallery img").count() == 1
    page.screenshot(path=SCREENSHOT, full_page=True)


def test_cancel_stops_a_running_job(page: Any, stack: RunningStack) -> None:
    page.fill("#prompt", "a long one")
    page.click("label[for=method-direct]")
    page.fill("#steps", "150")
    # 256 px keeps the job running for many seconds, so the click always lands mid-run.
    page.click("label[for=preset-custom]")
    page.fill("#width", "256")
    page.fill("#height", "256")
    page.click("#generate")
    status_is(page, stack, "running", 60)
    page.click("#cancel")
    status_is(page, stack, "canceled", 60)
    assert page.inner_text("#status").lower() == "canceled"
    assert page.is_enabled("#generate")
    assert page.is_visible("#figure") is False


def test_validation_error_names_the_field(page: Any) -> None:
    page.fill("#prompt", "too big")
    page.click("label[for=preset-custom]")
    page.fill("#width", "1024")
    page.fill("#height", "1024")
    page.click("#generate")
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert error.inner_text().startswith("Invalid width:")
    assert "pixel budget" in error.inner_text()
    assert page.get_attribute("#width", "aria-invalid") == "true"
    assert page.get_attribute("#status", "data-status") == "idle"


@pytest.mark.parametrize(
    ("status", "code", "message", "shown"),
    [
        (429, "queue_full", "the queue is full; retry later", "The queue is full"),
        (429, "rate_limited", "rate limit of 120 requests/minute exceeded", "Too many requests ("),
        (
            429, "too_many_active_jobs", "at most 16 queued or running generations per API key",
            "Too many generations queued or running at once (",
        ),
        (429, "some_new_limit", "slow down", "Refused for now: slow down. Try again in 5 s."),
        (503, "redis_unavailable", "the job store (Redis) is unreachable", "cannot take jobs"),
    ],
)
def test_refusals_are_explained(
    page: Any, status: int, code: str, message: str, shown: str
) -> None:
    # The server's real refusals need a full queue or a dead Redis; their shape is the API's
    # one error body, so the page is given exactly that body.
    body = json.dumps({"error": {"code": code, "message": message, "param": None}})
    page.route(
        "**/v1/generations",
        lambda route: route.fulfill(
            status=status,
            body=body,
            content_type="application/json",
            headers={"Retry-After": "5"},
        ),
    )
    page.fill("#prompt", "refused")
    page.keyboard.press("Control+Enter")  # the keyboard shortcut submits too
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert shown in error.inner_text() and message in error.inner_text()
    assert page.is_enabled("#generate")


@pytest.fixture
def keyed_api(stack: RunningStack) -> Iterator[ApiServer]:
    """A second API in keys mode on the same Redis prefix: the same worker runs its jobs."""
    settings = stack.settings.model_copy(
        update={"auth_mode": "keys", "api_keys": SecretStr("e2e:sk-playground")}
    )
    with ApiServer(create_app(settings), free_port()) as api:
        yield api


def test_api_key_mode_lists_models_and_shows_the_image(
    open_page: Callable[[str], Any], keyed_api: ApiServer, stack: RunningStack
) -> None:
    page = open_page(keyed_api.url + "/")
    page.locator("#error").wait_for(state="visible")
    assert page.inner_text("#error").startswith("Not allowed")
    page.click("summary")
    page.fill("#api-key", "sk-playground")
    page.press("#api-key", "Tab")  # `change` reloads the model list with the key
    with_model_list(page)
    page.fill("#prompt", "with a key")
    page.click("label[for=preset-2x]")
    page.fill("#steps", "3")
    page.click("#generate")
    status_is(page, stack, "succeeded")
    page.wait_for_function("document.querySelector('#result-image').naturalWidth > 0")
    size = page.eval_on_selector("#result-image", "i => [i.naturalWidth, i.naturalHeight]")
    assert size == [128, 128]
    assert page.get_attribute("#result-image", "src").startswith("blob:")


def test_direct_turns_the_tuned_switch_off_and_is_accepted(
    open_page: Callable[[str], Any], stack: RunningStack
) -> None:
    # A model with upsamplers, as the demo model under `make run`: the tiny model of this stack
    # has none, so its /v1/models entry is shown to the page with tuned_available set.
    page = open_page("about:blank")

    def with_upsamplers(route: Any) -> None:
        listing = route.fetch().json()
        for entry in listing["data"]:
            entry["tuned_available"] = True
        route.fulfill(json=listing)

    page.route("**/v1/models", with_upsamplers)
    sent: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda r: sent.append(r.post_data_json)
        if r.method == "POST" and r.url.endswith("/v1/generations")
        else None,
    )
    page.goto(stack.url + "/")
    with_model_list(page)
    assert page.is_enabled("#tuned") and page.is_checked("#tuned")

    page.click("label[for=method-direct]")
    assert page.is_disabled("#tuned")
    assert "self-cascade only" in page.inner_text("#tuned-hint")
    page.fill("#prompt", "direct on a tuned model")
    page.click("label[for=preset-2x]")
    page.fill("#steps", "3")
    page.click("#generate")
    status_is(page, stack, "succeeded")
    assert sent[-1]["method"] == "direct" and sent[-1]["tuned"] is False

    page.click("label[for=method-self_cascade]")
    assert page.is_enabled("#tuned") and page.is_checked("#tuned")


@pytest.mark.parametrize("stream", ["fails", "stalls"])
def test_following_rides_out_a_lost_connection(page: Any, stack: RunningStack, stream: str) -> None:
    # The API restarting, or Redis away for a moment: job reads fail for a while, some as a
    # network error, some as the API's 503, then get through again. The page keeps following
    # the job, says it is retrying, and shows the result once the server answers.
    # "fails": the event stream fails too, so the page falls back to polling.
    # "stalls": the stream hangs open without a word (a buffering proxy), so only the slow
    # backstop poll can notice the end of the job, and it too must survive the outage.
    page.evaluate(RECORD_NOTICES)
    outage = {"on": True}
    failed_reads: list[str] = []
    markup = "the job store <b>Redis</b> is unreachable"

    def flaky(route: Any) -> None:
        request = route.request
        if request.method != "GET":
            route.fallback()
        elif request.url.endswith("/events") and stream == "stalls":
            pass  # never answered: the stream neither opens nor fails
        elif not outage["on"]:
            route.fallback()
        elif request.url.endswith("/events"):
            route.abort("failed")
        else:
            failed_reads.append(request.url)
            if len(failed_reads) % 2:
                route.abort("failed")  # fetch rejects: a network error
            else:
                route.fulfill(
                    status=503,
                    body=api_error("redis_unavailable", markup),
                    content_type="application/json",
                    headers={"Retry-After": "1"},
                )

    page.route(is_job_status, flaky)
    generate_small(page, f"through an outage, stream {stream}")
    notice = page.locator("#notice")
    notice.wait_for(state="visible")
    assert "retrying" in notice.inner_text()
    # Several reads in a row fail, and the page is still following the job after each.
    wait_until(page, lambda: len(failed_reads) >= 3, 60, "three failed job reads")
    assert page.is_disabled("#generate") and page.is_enabled("#cancel")
    assert page.is_hidden("#error")
    outage["on"] = False

    status_is(page, stack, "succeeded", 120)
    page.wait_for_function("document.querySelector('#result-image').naturalWidth > 0")
    assert page.is_hidden("#notice") and page.inner_text("#notice") == ""
    assert page.is_hidden("#error")
    assert page.is_enabled("#generate")
    notices = page.evaluate("window.notices")
    assert any(n.startswith("Connection lost, retrying") for n in notices), notices
    # The 503's own message is shown as text, its markup never parsed.
    assert any(f"(503 {markup})" in n for n in notices), notices
    assert page.locator("#notice b").count() == 0


def test_a_job_the_server_no_longer_knows_ends_following(page: Any, stack: RunningStack) -> None:
    # Its record expired (or never was this key's): a 404 is final, not a reason to retry.
    def gone(route: Any) -> None:
        if route.request.method != "GET":
            route.fallback()
            return
        job_id = urlparse(route.request.url).path.split("/")[3]
        route.fulfill(
            status=404,
            body=api_error("not_found", f"no generation {job_id}", "job_id"),
            content_type="application/json",
        )

    page.route(is_job_status, gone)
    generate_small(page, "forgotten")
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert "no longer on the server" in error.inner_text()
    assert "no generation" in error.inner_text()
    assert page.get_attribute("#status", "data-status") == "gone"
    assert page.is_enabled("#generate") and page.is_disabled("#cancel")
    assert page.is_hidden("#notice")
