"""The playground with several models: a picker of GET /v1/models, the chosen model in the body,
and the readiness banner about the chosen model (its worker may hold only some of them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import with_model_list
from tests.e2e.test_playground import status_is
from tests.live_stack import write_models_file
from tests.running_stack import RunningStack, running_stack, write_tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_model_stack(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningStack]:
    folder = tmp_path_factory.mktemp("playground-models")
    model = write_tiny_model(folder)
    models = write_models_file(folder / "two-models.json", model, names=("tiny", "other"))
    # The worker holds "tiny" only: "other" has no worker, its jobs wait.
    with running_stack(
        redis_url, folder / "data", model, "playground-models-1", models_file=models,
        worker_models="tiny",
    ) as running:
        yield running


@pytest.fixture
def models_page(open_page: Callable[[str], Any], two_model_stack: RunningStack) -> Any:
    return with_model_list(open_page(two_model_stack.url + "/"))


def test_the_chosen_model_is_the_one_generated_with(
    models_page: Any, two_model_stack: RunningStack
) -> None:
    page, stack = models_page, two_model_stack
    # Was no picker at all: only the first model in the file could be used.
    assert page.is_visible("#model-choice")
    options = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert options == ["tiny", "other"]
    page.wait_for_timeout(500)  # the first readiness answer
    assert page.is_hidden("#readiness")  # a worker holds tiny

    page.select_option("#model", "other")
    banner = page.locator("#readiness")
    banner.wait_for(state="visible")
    assert "no live worker holds model(s): other" in banner.inner_text()
    page.fill("#prompt", "queued for a worker that holds it")
    page.fill("#steps", "2")
    assert _generate(page)["params"]["model"] == "other"
    status_is(page, stack, "queued")
    page.click("#cancel")
    status_is(page, stack, "canceled")

    page.select_option("#model", "tiny")
    banner.wait_for(state="hidden")
    page.fill("#prompt", "a red circle")
    assert _generate(page)["params"]["model"] == "tiny"
    status_is(page, stack, "succeeded")


def test_readyz_answers_for_the_models_asked_about(two_model_stack: RunningStack) -> None:
    with httpx.Client(base_url=two_model_stack.url, timeout=10) as client:
        # Any model held is ready (it was a 503 while any model lacked a worker).
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["models"] == {"tiny": 1, "other": 0}
        assert client.get("/readyz", params={"model": "tiny"}).status_code == 200
        missing = client.get("/readyz", params={"model": ["tiny", "other"]})
        assert missing.status_code == 503
        assert missing.json()["error"]["message"] == "no live worker holds model(s): other"
        unknown = client.get("/readyz", params={"model": "sdxl"})
        assert unknown.status_code == 422 and "sdxl" in unknown.json()["error"]["message"]


def _generate(page: Any) -> dict:
    """Click Generate; the job the API made of the page's request."""

    def created(response: Any) -> bool:
        return bool(
            response.request.method == "POST" and response.url.endswith("/v1/generations")
        )

    with page.expect_response(created) as answer:
        page.click("#generate")
    job: dict = answer.value.json()
    return job
