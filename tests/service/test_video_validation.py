"""Video parameters at the HTTP boundary: each model's modality decides which fields and formats
it takes, and every refusal is a 422 naming the parameter. The API never loads a model, so the
video model here is only an entry in the models file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from contract.settings import ModelSpec, Settings, load_model_specs
from service.app import create_app
from tests.conftest import free_port
from tests.live_stack import ApiServer
from tests.service.conftest import SettingsFactory
from tests.service.test_validation import assert_error

pytestmark = pytest.mark.integration

VIDEO = {"prompt": "a boat", "model": "clips", "width": 64, "height": 64, "steps": 4}
IMAGE = {"prompt": "a boat", "model": "tiny", "width": 64, "height": 64, "steps": 4}


def models_file(path: Path, tiny_model_dir: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            [
                {"name": "tiny", "path": str(tiny_model_dir), "native_width": 64,
                 "native_height": 64},
                {"name": "clips", "path": "org/some-text-to-video", "produces": "video",
                 "native_width": 64, "native_height": 64, "default_num_frames": 8,
                 "max_num_frames": 24, "default_fps": 10},
            ]
        )
    )
    return path


@pytest.fixture
def settings(settings_for: SettingsFactory, tmp_path: Path, tiny_model_dir: Path) -> Settings:
    return settings_for(models_file=models_file(tmp_path / "video-models.json", tiny_model_dir))


@pytest.fixture
def client(settings: Settings) -> Iterator[httpx.Client]:
    with ApiServer(create_app(settings), free_port()) as api, api.client() as c:
        yield c


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({**IMAGE, "num_frames": 8}, "num_frames", "tiny produces images"),
        ({**IMAGE, "fps": 12}, "fps", "video models: clips"),
        ({**IMAGE, "output_format": "mp4"}, "output_format", "png, webp, jpeg"),
        ({**VIDEO, "output_format": "png"}, "output_format", "produces video: use mp4, webm, gif"),
        ({**VIDEO, "num_frames": 25}, "num_frames", "at most 24 frames"),
        ({**VIDEO, "num_frames": 0}, "num_frames", "greater than or equal to 1"),
        ({**VIDEO, "num_frames": 65}, "num_frames", "less than or equal to 64"),
        ({**VIDEO, "num_frames": 2.5}, "num_frames", "integer"),
        ({**VIDEO, "num_frames": "8"}, "num_frames", "must be an integer, not a string"),
        ({**VIDEO, "fps": "8"}, "fps", "must be an integer, not a string"),
        ({**VIDEO, "fps": 0}, "fps", "greater than or equal to 1"),
        ({**VIDEO, "fps": 61}, "fps", "less than or equal to 60"),
        ({**VIDEO, "output_format": "avi"}, "output_format", "mp4"),
        ({**VIDEO, "output_format": "gif", "fps": 60}, "fps", "gif plays at most 50 fps"),
    ],
)
def test_modality_and_range_rules_answer_422_naming_the_param(
    client: httpx.Client, body: dict, param: str, says: str
) -> None:
    answer = client.post("/v1/generations", json=body)
    assert_error(answer, 422, "invalid_request", param)
    assert says in answer.json()["error"]["message"]


def test_a_clip_past_the_video_budget_is_refused_naming_num_frames(
    settings_for: SettingsFactory, tmp_path: Path, tiny_model_dir: Path
) -> None:
    # Each frame within max_pixels once let 64 frames of 2048^2 in: hours of a worker's time.
    path = models_file(tmp_path / "video.json", tiny_model_dir)
    settings = settings_for(models_file=path, max_video_pixels=64 * 64 * 8)
    with ApiServer(create_app(settings), free_port()) as api, api.client() as client:
        assert client.post("/v1/generations", json={**VIDEO, "num_frames": 8}).status_code == 202
        answer = client.post("/v1/generations", json={**VIDEO, "num_frames": 9})
        assert_error(answer, 422, "invalid_request", "num_frames")
        assert answer.json()["error"]["message"] == (
            "num_frames: 9 frames of 64x64 exceed the video budget of 32768 pixels (frames x "
            "width x height); fewer frames or a smaller size fit"
        )
        # Frames not asked for are the model's default, which the message says it counted.
        default = client.post("/v1/generations", json={**VIDEO, "width": 128})
        assert default.json()["error"]["message"].startswith(
            "num_frames: the model's 8 frames of 128x64 exceed the video budget"
        )


def test_odd_sizes_are_refused_for_mp4_only(
    settings_for: SettingsFactory, tmp_path: Path, tiny_model_dir: Path
) -> None:
    path = models_file(tmp_path / "odd.json", tiny_model_dir)
    entries = json.loads(path.read_text())
    entries[1]["size_multiple"] = 1  # a models file may allow any size
    path.write_text(json.dumps(entries))
    app = create_app(settings_for(models_file=path))
    with ApiServer(app, free_port()) as api, api.client() as client:
        answer = client.post("/v1/generations", json={**VIDEO, "width": 63})
        assert_error(answer, 422, "invalid_request", "width")
        assert "even width" in answer.json()["error"]["message"]
        gif = client.post("/v1/generations", json={**VIDEO, "width": 63, "output_format": "gif"})
        assert gif.status_code == 202, gif.text


def test_a_video_request_gets_the_models_defaults(client: httpx.Client) -> None:
    answer = client.post("/v1/generations", json=VIDEO)
    assert answer.status_code == 202, answer.text
    params = answer.json()["params"]
    assert (params["output_format"], params["num_frames"], params["fps"]) == ("mp4", 8, 10)

    chosen = client.post(
        "/v1/generations", json={**VIDEO, "num_frames": 24, "fps": 24, "output_format": "webm"}
    )
    assert chosen.status_code == 202, chosen.text
    params = chosen.json()["params"]
    assert (params["output_format"], params["num_frames"], params["fps"]) == ("webm", 24, 24)


def test_an_image_request_is_unchanged(client: httpx.Client) -> None:
    params = client.post("/v1/generations", json=IMAGE).json()["params"]
    assert (params["output_format"], params["num_frames"], params["fps"]) == ("png", None, None)


def test_models_say_which_produce_video(client: httpx.Client) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["tiny"]["produces"] == "image"
    assert models["tiny"]["output_formats"] == ["png", "webp", "jpeg"]
    assert models["tiny"]["default_num_frames"] is None
    clips = models["clips"]
    assert clips["produces"] == "video"
    assert clips["output_formats"] == ["mp4", "webm", "gif"]
    assert (clips["default_num_frames"], clips["max_num_frames"], clips["default_fps"]) == (
        8, 24, 10,
    )


def test_the_openai_images_route_refuses_a_video_model(client: httpx.Client) -> None:
    answer = client.post("/v1/images/generations", json={"prompt": "a boat", "model": "clips"})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == "model" and "POST /v1/generations" in error["message"]


def test_modality_is_read_from_a_local_folder_unless_declared(
    tmp_path: Path, settings: Settings
) -> None:
    folder = tmp_path / "t2v"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "TextToVideoSDPipeline"}))
    path = tmp_path / "detect.json"
    entry = {"path": str(folder), "native_width": 64, "native_height": 64}
    path.write_text(
        json.dumps(
            [
                {**entry, "name": "found"},
                {**entry, "name": "declared", "produces": "image"},
                {**entry, "name": "hub", "path": "org/unreadable-here"},
            ]
        )
    )
    specs: dict[str, ModelSpec] = {
        s.name: s for s in load_model_specs(settings.model_copy(update={"models_file": path}))
    }
    assert specs["found"].produces == "video"
    assert specs["declared"].produces == "image"
    assert specs["hub"].produces == "image"
