"""Every validation rule answers 422 (or 413, 429) in the uniform error shape, naming the param."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from redis import Redis

from contract.keys import RedisKeys
from contract.settings import ModelSpec
from service.app import create_app
from service.errors import ApiError
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
        ({"tuned": "yes"}, "tuned"),  # strictly true, false or "auto"
        ({"tuned": 1}, "tuned"),
        ({"tuned": "AUTO"}, "tuned"),
        ({"pivot_strength": 0}, "pivot_strength"),
        ({"pivot_strength": 1.5}, "pivot_strength"),
        # 2 x 0.4 rounds down to no re-noise step at a size above native
        ({"steps": 2, "pivot_strength": 0.4, "width": 128, "height": 128}, "pivot_strength"),
        ({"output_format": "gif"}, "output_format"),
        ({"scheduler": "pndm"}, "scheduler"),
        ({"lr_features": "per_epoch"}, "lr_features"),
        ({"tuned": True}, "tuned"),  # the tiny model has no upsampler checkpoint
        ({"unexpected": 1}, "unexpected"),
        ({"prompt": " \n\t "}, "prompt"),  # blank: conditions on nothing
        ({"steps": True}, "steps"),  # not taken as 1
        ({"model": ""}, "model"),  # not the default model
        ({"metadata": ["order-7"]}, "metadata"),
        ({"metadata": {"order": 7}}, "metadata.order"),  # strings only, never coerced
        ({"metadata": {"order": "x" * 513}}, "metadata.order"),
        ({"metadata": {"": "x"}}, "metadata"),
        ({"metadata": {"k" * 65: "x"}}, "metadata"),
        ({"metadata": {f"k{i}": "x" for i in range(17)}}, "metadata"),
        # Numbers are JSON numbers: a string is refused, never parsed (pydantic's lax mode
        # would take "128" as 128), as is a boolean (`true` would be 1, or 1.0)
        ({"width": "128"}, "width"),
        ({"height": "128"}, "height"),
        ({"seed": "1"}, "seed"),
        ({"steps": "4"}, "steps"),
        ({"guidance_scale": "7.5"}, "guidance_scale"),
        ({"guidance_scale": True}, "guidance_scale"),
        ({"pivot_strength": "0.5"}, "pivot_strength"),
        ({"pivot_strength": True}, "pivot_strength"),  # 1.0 would be a valid strength
        ({"width": 128.5}, "width"),  # an integral float is a count, a fraction is not
        # Events for a webhook never given: dropped silently before, surely a forgotten webhook.
        ({"webhook_events_filter": ["start"]}, "webhook_events_filter"),
    ],
)
def test_each_rule_answers_422_naming_the_param(
    client: httpx.Client, change: dict, param: str
) -> None:
    body = {**VALID, **change}
    if change.get("prompt", "") is None:
        del body["prompt"]
    assert_error(client.post("/v1/generations", json=body), 422, "invalid_request", param)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"seed": "1"}, "seed: must be an integer, not a string"),
        ({"steps": True}, "steps: must be an integer, not true or false"),
        ({"guidance_scale": "7.5"}, "guidance_scale: must be a number, not a string"),
        ({"pivot_strength": True}, "pivot_strength: must be a number, not true or false"),
    ],
)
def test_a_number_sent_as_anything_else_says_so(
    client: httpx.Client, change: dict, says: str
) -> None:
    answer = client.post("/v1/generations", json={**VALID, **change})
    assert answer.json()["error"]["message"] == says
    # The OpenAI route takes the same fields by the same rules, in OpenAI's shape.
    [(name, value)] = change.items()
    openai = client.post("/v1/images/generations", json={"prompt": "x", name: value})
    assert openai.status_code == 400 and openai.json()["error"]["message"] == says


def test_integral_numbers_are_taken_in_either_spelling(client: httpx.Client) -> None:
    # 128.0 is a count (a client that computes sizes in floating point, as JavaScript does,
    # sends it so) and 7 a guidance scale.
    body = {**VALID, "width": 128.0, "seed": 5.0, "steps": 4.0, "guidance_scale": 7}
    answer = client.post("/v1/generations", json=body)
    assert answer.status_code == 202, answer.text
    params = answer.json()["params"]
    assert (params["width"], params["seed"], params["steps"]) == (128, 5, 4)
    assert params["guidance_scale"] == 7.0


@pytest.mark.parametrize(
    ("extra_body", "param", "says"),
    [
        # The native body's fields, by the native rules (each is refused before a job exists)
        ({"tuned": True}, "tuned", "tuned: model tiny has no tuned upsamplers; use false or auto"),
        ({"tuned": "yes"}, "tuned", 'tuned: must be true, false or "auto"'),
        ({"method": "direct", "tuned": True}, "tuned", "use method self_cascade or tuned false"),
        ({"pivot_strength": 1.5}, "pivot_strength", "less than or equal to 1"),
        ({"steps": 2, "pivot_strength": 0.4}, "pivot_strength", "must be at least 1"),
        ({"scheduler": "pndm"}, "scheduler", "'ddim', 'dpmsolver++' or 'euler'"),
        ({"upsample_mode": "nearest"}, "upsample_mode", "'bilinear' or 'bicubic'"),
        ({"lr_features": "per_epoch"}, "lr_features", "'per_step' or 'per_stage'"),
        ({"metadata": {"order": 7}}, "metadata.order", "valid string"),
        ({"metadata": {f"k{i}": "x" for i in range(17)}}, "metadata", "at most 16 items"),
        ({"priority": "urgent"}, "priority", "'interactive' or 'batch'"),
        ({"webhook": "https://example.com/hook"}, "webhook", "webhooks are disabled"),
        ({"webhook_events_filter": ["done"]}, "webhook_events_filter.0", "'completed'"),
        ({"steps": "4"}, "steps", "steps: must be an integer, not a string"),
        # What OpenAI's shape has its own way, the video-only fields, and a typo
        ({"width": 128}, "width", "Extra inputs are not permitted"),
        ({"height": 128}, "height", "Extra inputs are not permitted"),
        ({"num_frames": 8}, "num_frames", "Extra inputs are not permitted"),
        ({"fps": 8}, "fps", "Extra inputs are not permitted"),
        ({"stepz": 2}, "stepz", "Extra inputs are not permitted"),
        ({"output_format": "gif"}, "output_format", "'png', 'webp' or 'jpeg'"),
    ],
)
def test_the_openai_route_takes_the_native_fields_by_the_native_rules(
    client: httpx.Client, extra_body: dict, param: str, says: str
) -> None:
    body = {"prompt": "x", "size": "128x128", **extra_body}
    answer = client.post("/v1/images/generations", json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error", param, "invalid_request"
    )
    assert says in error["message"]


def test_a_bad_metadata_key_is_named_in_the_message(client: httpx.Client) -> None:
    answer = client.post("/v1/generations", json={**VALID, "metadata": {"k" * 65: "x"}})
    message = answer.json()["error"]["message"]
    assert message == f"metadata: key {'k' * 65!r}: String should have at most 64 characters"


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
    # The OpenAI route answers in OpenAI's shape, a 413 included.
    openai = client.post("/v1/images/generations", json={"prompt": "x" * 5000})
    assert openai.status_code == 413
    assert openai.json()["error"]["type"] == "invalid_request_error"
    # And every 413 is counted.
    metrics = client.get("/metrics").text
    assert 'selfcascade_http_requests_total{method="POST",route="unmatched",status="413"} 3.0' in (
        metrics
    )


@pytest.mark.parametrize(
    ("content", "content_type", "status", "says"),
    [
        (b'{"prompt": "x",', "application/json", 422, "the body is not valid JSON: "),
        (b'{"prompt": "x"}', None, 415, "Content-Type: application/json (got none)"),
        (b"prompt=x", "application/x-www-form-urlencoded", 415, "(got 'application/x-www-f"),
        (b"[1, 2]", "application/json", 422, "the body must be a JSON object"),
        (b"", "application/json", 422, "the body is empty; send a JSON object"),
        (b'{"prompt": "\xff"}', "application/json", 422, "not valid JSON: it is not UTF-8 text"),
        # json.loads gives up (RecursionError) at ~1000 levels: within this 4096-byte limit
        (b"[" * 2000 + b"]" * 2000, "application/json", 422, "it is nested too deeply"),
        (b'{"prompt": "x"}', "text/json", 415, "(got 'text/json')"),  # FastAPI reads it not
        (b"", None, 415, "Content-Type: application/json (got none)"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_named_as_such(
    client: httpx.Client, content: bytes, content_type: str | None, status: int, says: str
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    answer = client.post("/v1/generations", content=content, headers=headers)
    assert_error(answer, status, "invalid_request", None)  # no field: a character offset is not
    assert says in answer.json()["error"]["message"]
    openai = client.post("/v1/images/generations", content=content, headers=headers)
    assert openai.status_code == (400 if status == 422 else status)  # OpenAI's shape and codes
    assert says in openai.json()["error"]["message"] and openai.json()["error"]["param"] is None


@pytest.mark.parametrize(
    ("content", "says"),
    [
        # As a tester sent it: 40 KB, 20000 levels of arrays
        (b"[" * 20000 + b"]" * 20000, "could not be parsed as JSON: it is nested too deeply"),
        # The same inside a field
        (b'{"prompt": "x", "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
        # Python parses no integer of more than 4300 digits (sys.int_info.default_max_str_digits)
        (
            b'{"prompt": "x", "seed": ' + b"1" * 5000 + b"}",
            "the body could not be parsed as JSON: a number in it has too many digits",
        ),
    ],
)
def test_json_that_python_cannot_parse_is_422_saying_why(
    settings_for: SettingsFactory, content: bytes, says: str
) -> None:
    headers = {"Content-Type": "application/json"}
    with ApiServer(create_app(settings_for()), free_port()) as api, api.client() as client:
        answer = client.post("/v1/generations", content=content, headers=headers)
        openai = client.post("/v1/images/generations", content=content, headers=headers)
    assert_error(answer, 422, "invalid_request", None)
    assert says in answer.json()["error"]["message"]
    # The OpenAI route answers bad input as OpenAI does: 400, in its shape.
    assert openai.status_code == 400, openai.text
    error = openai.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is None
    assert says in error["message"]


def test_a_validators_message_reads_as_its_own_words(client: httpx.Client) -> None:
    answer = client.post("/v1/generations", json={**VALID, "tuned": "yes"})
    assert answer.json()["error"]["message"] == 'tuned: must be true, false or "auto"'


def test_a_method_a_route_does_not_serve_says_which_it_does(client: httpx.Client) -> None:
    answer = client.put("/v1/generations", json=VALID)
    assert_error(answer, 405, "method_not_allowed", None)
    assert answer.json()["error"]["message"] == "PUT is not allowed on /v1/generations; use POST"


def test_a_bad_header_is_named_as_clients_spell_it(client: httpx.Client) -> None:
    answer = client.post("/v1/generations", json=VALID, headers={"Idempotency-Key": "k" * 201})
    assert_error(answer, 422, "invalid_request", "Idempotency-Key")


def test_an_unexpected_error_is_500_in_the_error_shape_with_the_request_id(
    settings_for: SettingsFactory,
) -> None:
    app = create_app(settings_for())

    def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)
    with ApiServer(app, free_port()) as api, api.client() as client:
        answer = client.get("/broken", headers={"X-Request-ID": "req-500"})
    assert_error(answer, 500, "internal_error", None)
    assert answer.headers["x-request-id"] == "req-500"  # the one id worth quoting in a report


def test_a_record_this_release_cannot_read_is_a_500_that_says_so(
    settings_for: SettingsFactory, redis_client: Redis, key_prefix: str
) -> None:
    with ApiServer(create_app(settings_for()), free_port()) as api, api.client() as client:
        job_id = client.post("/v1/generations", json=VALID).json()["id"]
        # As a newer worker could leave it mid-upgrade: a value this release does not know.
        redis_client.hset(RedisKeys(key_prefix).job(job_id), "status", "paused")
        answer = client.get(f"/v1/generations/{job_id}", headers={"X-Request-ID": "req-old"})
    assert_error(answer, 500, "internal_error", None)
    assert "cannot be read by this release (written by a newer one?)" in answer.text
    assert answer.headers["x-request-id"] == "req-old"


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


BUDGET = 2048 * 2048  # the default pixel budget, which a long thin picture fits


def test_a_side_too_long_for_webp_is_422_before_the_job_runs(
    settings_for: SettingsFactory,
) -> None:
    app = create_app(settings_for(max_pixels=BUDGET))
    with ApiServer(app, free_port()) as api, api.client() as client:
        for width, height, param in ((16384, 256, "width"), (256, 16384, "height")):
            body = {**VALID, "width": width, "height": height, "output_format": "webp"}
            answer = client.post("/v1/generations", json=body)
            assert_error(answer, 422, "invalid_request", param)
            assert answer.json()["error"]["message"] == (
                f"{param}: webp allows at most 16383 px per side, got 16384"
            )
        png = {**VALID, "width": 16384, "height": 256, "output_format": "png"}
        assert client.post("/v1/generations", json=png).status_code == 202


@pytest.mark.parametrize(
    ("output_format", "max_side"),
    [("webp", 16383), ("jpeg", 65500), ("gif", 65535), ("mp4", 16384), ("webm", 65536)],
)
def test_each_format_refuses_a_side_its_encoder_cannot_take(
    settings_for: SettingsFactory, output_format: str, max_side: int
) -> None:
    produces = "image" if output_format in ("webp", "jpeg") else "video"
    spec = ModelSpec(
        name="any-size", path="unused", native_width=64, native_height=64, size_multiple=1,
        produces=produces,
    )
    settings = settings_for(max_pixels=BUDGET)
    fits = GenerationCreate(
        prompt="p", width=max_side, height=2, output_format=output_format, method="direct"
    )
    assert normalise(fits, [spec], settings).width == max_side
    for width, height, param in ((max_side + 2, 2, "width"), (2, max_side + 2, "height")):
        body = fits.model_copy(update={"width": width, "height": height})
        with pytest.raises(ApiError) as refused:
            normalise(body, [spec], settings)
        assert (refused.value.status, refused.value.param) == (422, param)
        assert f"{output_format} allows at most {max_side} px per side" in str(refused.value)
