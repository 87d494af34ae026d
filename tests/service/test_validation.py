"""Every validation rule answers 422 (or 413, 429) in the uniform error shape, naming the param."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from contract.settings import ModelSpec
from service.app import create_app
from service.schemas import GenerationCreate
from service.validation import normalise
from tests.conftest import free_port
from tests.live_stack import ApiServer
from tests.service.conftest import SettingsFactory

pytestmark = pytest.mark.integration

VALID = {"prompt": "a lighthouse", "width": 128, "height": 128, "steps": 4}


@pytest.fixture
def client(settings_for: SettingsFactory) -> Iterator[httpx.Client]:
    app = create_app(settings_for(max_body_bytes=4096))
    with ApiServer(app, free_port()) as api, api.client() as c:
        yield c


def assert_error(response: httpx.Response, status: int, code: str, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["param"] == param
    assert error["message"]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"negative_prompt": "x" * 2001}, "negative_prompt"),
        ({"width": 100}, "width"),  # not a multiple of 8
        ({"height": 0}, "height"),
        ({"width": "wide"}, "width"),
        ({"width": 512, "height": 512}, "width"),  # above the 256x256 pixel budget
        ({"steps": 0}, "steps"),
        ({"steps": 151}, "steps"),
        ({"guidance_scale": -0.5}, "guidance_scale"),
        ({"guidance_scale": 30.5}, "guidance_scale"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"model": "sdxl-that-is-not-here"}, "model"),
        ({"method": "bogus"}, "method"),
        ({"pivot_strength": 0}, "pivot_strength"),
        ({"pivot_strength": 1.5}, "pivot_strength"),
        # 2 x 0.4 rounds down to no re-noise step at a size above native
        ({"steps": 2, "pivot_strength": 0.4, "width": 128, "height": 128}, "pivot_strength"),
        ({"output_format": "gif"}, "output_format"),
        ({"scheduler": "pndm"}, "scheduler"),
        ({"lr_features": "per_epoch"}, "lr_features"),
        ({"tuned": True}, "tuned"),  # the tiny model has no upsampler checkpoint
        ({"unexpected": 1}, "unexpected"),
    ],
)
def test_each_rule_answers_422_naming_the_param(
    client: httpx.Client, change: dict, param: str
) -> None:
    body = {**VALID, **change}
    if change.get("prompt", "") is None:
        del body["prompt"]
    assert_error(client.post("/v1/generations", json=body), 422, "invalid_request", param)


def test_malformed_json_is_422(client: httpx.Client) -> None:
    answer = client.post(
        "/v1/generations", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert answer.status_code == 422
    assert answer.json()["error"]["code"] == "invalid_request"


def test_body_over_the_limit_is_413(client: httpx.Client) -> None:
    big = {**VALID, "prompt": "x" * 5000}
    assert_error(client.post("/v1/generations", json=big), 413, "body_too_large", None)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    answer = client.post(
        "/v1/generations", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_error(answer, 413, "body_too_large", None)


def test_defaults_fill_in_from_the_model(client: httpx.Client) -> None:
    answer = client.post("/v1/generations", json={"prompt": "defaults"})
    assert answer.status_code == 202
    params = answer.json()["params"]
    assert (params["model"], params["width"], params["height"]) == ("tiny", 64, 64)
    assert params["steps"] == 50 and params["method"] == "self_cascade"
    assert params["pivot_strength"] == 0.7  # the paper's K, as this model's spec names none
    (model,) = client.get("/v1/models").json()["data"]
    assert model["default_pivot_strength"] == 0.7


@pytest.mark.parametrize(("asked", "expected"), [(None, 0.4), (0.7, 0.7), (0.25, 0.25)])
def test_pivot_strength_defaults_to_the_models_own(
    settings_for: SettingsFactory, asked: float | None, expected: float
) -> None:
    spec = ModelSpec(
        name="small-objects", path="unused", native_width=64, native_height=64,
        default_pivot_strength=0.4,
    )
    body = GenerationCreate(prompt="k", width=128, height=128, pivot_strength=asked)
    assert normalise(body, [spec], settings_for()).pivot_strength == expected


def test_full_queue_answers_429_with_retry_after(settings_for: SettingsFactory) -> None:
    app = create_app(settings_for(max_queue_length=1))
    with ApiServer(app, free_port()) as api, api.client() as client:
        assert client.post("/v1/generations", json=VALID).status_code == 202
        answer = client.post("/v1/generations", json=VALID)
        assert_error(answer, 429, "queue_full", None)
        assert int(answer.headers["retry-after"]) > 0


def test_readyz_is_503_without_a_worker(client: httpx.Client) -> None:
    answer = client.get("/readyz")
    assert_error(answer, 503, "model_unavailable", "model")
    assert client.get("/healthz").status_code == 200
