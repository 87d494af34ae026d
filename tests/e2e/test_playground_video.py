"""The playground with a video model: frame and fps fields from GET /v1/models, the clip shown
in a <video> with its poster, a gallery thumbnail from the poster."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e.conftest import with_model_list
from tests.e2e.test_playground import status_is
from tests.running_stack import RunningStack, running_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def video_stack(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningStack]:
    from selfcascade.tiny_models import save_tiny_text_to_video

    folder = tmp_path_factory.mktemp("playground-video")
    # The models file names it "tiny"; that it produces video is read from its folder.
    model = save_tiny_text_to_video(folder / "tiny-t2v")
    with running_stack(redis_url, folder / "data", model, "playground-video-1") as running:
        yield running


@pytest.fixture
def video_page(open_page: Callable[[str], Any], video_stack: RunningStack) -> Any:
    return with_model_list(open_page(video_stack.url + "/"))


def test_an_image_model_shows_no_video_fields(page: Any) -> None:
    assert page.is_hidden("#video-fields")


def test_a_video_job_plays_in_a_video_element_with_its_poster(
    video_page: Any, video_stack: RunningStack
) -> None:
    page = video_page
    assert page.is_visible("#video-fields")
    assert page.input_value("#num_frames") == "16" and page.input_value("#fps") == "8"
    page.fill("#prompt", "a paper boat")
    page.fill("#num_frames", "4")
    page.fill("#fps", "8")
    page.fill("#steps", "2")
    page.click("#generate")
    status_is(page, video_stack, "succeeded")

    video = page.locator("#result-video")
    video.wait_for(state="visible")  # the result is shown once its URLs are resolved
    assert page.is_hidden("#result-image")
    assert video.get_attribute("src").endswith("/outputs/0")
    assert video.get_attribute("poster").endswith("/outputs/1")
    # The browser fetched and parsed the mp4: its own idea of the clip's size and length.
    page.wait_for_function("document.querySelector('#result-video').readyState >= 1")
    width, height, duration = page.eval_on_selector(
        "#result-video", "v => [v.videoWidth, v.videoHeight, v.duration]"
    )
    assert (width, height) == (64, 64) and duration == pytest.approx(0.5, abs=0.05)
    assert "4 frames at 8 fps (0.5 s)" in page.inner_text("#caption")
    thumbnail = page.locator("#gallery img")
    assert thumbnail.count() == 1
    page.wait_for_function("document.querySelector('#gallery img').src.endsWith('/outputs/1')")


def test_a_frame_count_over_the_models_limit_highlights_the_field(video_page: Any) -> None:
    video_page.fill("#prompt", "too long")
    video_page.fill("#num_frames", "65")
    video_page.click("#generate")
    error = video_page.locator("#error")
    error.wait_for(state="visible")
    assert error.inner_text().startswith("Invalid num_frames:")
    assert video_page.get_attribute("#num_frames", "aria-invalid") == "true"
