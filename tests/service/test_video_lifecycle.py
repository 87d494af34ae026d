"""A video job through the whole service: real Redis, a real worker subprocess holding a tiny
text-to-video model, the API under uvicorn. POST, follow progress by stage and step, download
the clip and decode it to the requested frames and size."""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import Iterator

import av
import httpx
import pytest
from PIL import Image
from redis import Redis

from service.app import create_app
from tests.conftest import free_port
from tests.live_stack import ApiServer, WorkerProcess, wait_for, wait_status
from tests.service.conftest import make_settings
from tests.service.test_lifecycle import read_sse

pytestmark = pytest.mark.integration

# 128 px from a 64 px model: two stages (text-to-video, then one re-noise stage), a few seconds.
CLIP = {
    "prompt": "a paper boat on a pond",
    "width": 128,
    "height": 128,
    "steps": 4,
    "num_frames": 6,
    "fps": 12,
    "seed": 3,
}


@pytest.fixture(scope="module")
def client(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    from selfcascade.tiny_models import save_tiny_text_to_video

    data = tmp_path_factory.mktemp("video")
    model = save_tiny_text_to_video(data / "tiny-t2v")
    # No `produces`: the API and the worker both read it from the folder's model_index.json.
    models = data / "video-models.json"
    models.write_text(
        json.dumps([{"name": "clips", "path": str(model), "native_width": 64,
                     "native_height": 64, "default_num_frames": 4}])
    )
    settings = make_settings(
        redis_url, f"t{uuid.uuid4().hex[:10]}", data, model, models_file=models
    )
    redis = Redis.from_url(redis_url)
    worker = WorkerProcess(settings, "video-1", data).start()
    try:
        worker.wait_ready(redis)
        with ApiServer(create_app(settings), free_port()) as api, api.client() as c:
            yield c
    finally:
        worker.stop()
        redis.close()


def decode(data: bytes) -> tuple[list[Image.Image], float, str]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_image() for frame in container.decode(stream)]
        return frames, float(stream.average_rate or 0), stream.codec_context.name


def download(client: httpx.Client, output: dict, content_type: str) -> bytes:
    answer = client.get(output["url"])
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == content_type
    assert hashlib.sha256(answer.content).hexdigest() == output["sha256"]
    assert len(answer.content) == output["bytes"]
    return answer.content


def test_a_video_job_reports_progress_and_downloads_as_a_decodable_mp4(
    client: httpx.Client,
) -> None:
    assert client.get("/v1/models").json()["data"][0]["produces"] == "video"
    created = client.post("/v1/generations", json=CLIP)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    assert created.json()["params"]["output_format"] == "mp4"  # a video model's default

    events = read_sse(client, job_id)  # returns at the terminal event
    names = [name for name, _ in events]
    assert names[0] == "queued" and names[1] == "started" and names[-1] == "succeeded", names
    progress = [e["progress"] for name, e in events if name == "progress"]
    assert {p["stage"] for p in progress} == {1, 2} and {p["stages"] for p in progress} == {2}
    assert [p["fraction"] for p in progress] == sorted(p["fraction"] for p in progress)
    assert progress[-1]["fraction"] == 1.0

    job = client.get(f"/v1/generations/{job_id}").json()
    assert job["status"] == "succeeded", job
    assert (job["params"]["num_frames"], job["params"]["fps"]) == (6, 12)
    assert len(job["metrics"]["stage_seconds"]) == 2
    video, poster = job["outputs"]
    assert (video["role"], video["format"]) == ("video", "mp4")
    assert (video["frames"], video["fps"]) == (6, 12)
    assert (video["width"], video["height"], video["duration_s"]) == (128, 128, 0.5)

    frames, fps, codec = decode(download(client, video, "video/mp4"))
    assert codec == "h264" and fps == 12
    assert len(frames) == 6 and {f.size for f in frames} == {(128, 128)}

    assert (poster["role"], poster["format"]) == ("poster", "png")
    still = Image.open(io.BytesIO(download(client, poster, "image/png")))
    assert still.size == (128, 128)


@pytest.mark.parametrize(("fmt", "content_type"), [("webm", "video/webm"), ("gif", "image/gif")])
def test_webm_and_gif_use_the_models_default_frame_count(
    client: httpx.Client, fmt: str, content_type: str
) -> None:
    body = {"prompt": "a kite", "steps": 2, "output_format": fmt}  # native 64 px, 4 frames
    created = client.post("/v1/generations", json={**body, "fps": 8})
    assert created.status_code == 202, created.text
    events = read_sse(client, created.json()["id"])
    assert events[-1][0] == "succeeded", events[-1]
    video = client.get(f"/v1/generations/{created.json()['id']}").json()["outputs"][0]
    assert (video["format"], video["frames"], video["width"]) == (fmt, 4, 64)
    data = download(client, video, content_type)
    if fmt == "gif":
        gif = Image.open(io.BytesIO(data))
        delays = []
        for index in range(gif.n_frames):  # identical neighbours may merge; the length may not
            gif.seek(index)
            delays.append(gif.info["duration"])
        assert gif.size == (64, 64) and sum(delays) == 500  # 4 frames at 8 fps
    else:
        frames, fps, codec = decode(data)
        assert (codec, fps, len(frames), frames[0].size) == ("vp9", 8, 4, (64, 64))


def test_an_image_format_for_the_video_model_is_refused(client: httpx.Client) -> None:
    answer = client.post("/v1/generations", json={**CLIP, "output_format": "png"})
    assert answer.status_code == 422
    assert answer.json()["error"]["param"] == "output_format"


def test_a_running_video_job_cancels_between_two_steps(client: httpx.Client) -> None:
    # 8 frames of 128 px take about a second a step on a CPU: 150 direct steps cannot finish
    # before the cancel lands, and one step is short enough for it to land quickly.
    slow = {"prompt": "a long clip", "width": 128, "height": 128, "num_frames": 8,
            "steps": 150, "method": "direct"}
    created = client.post("/v1/generations", json=slow)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    # Cancel once a step has been reported, so the job is truly between two steps.
    wait_for(lambda: client.get(f"/v1/generations/{job_id}").json()["progress"], 120,
             "the clip's first step", interval_s=0.05)
    assert client.post(f"/v1/generations/{job_id}/cancel").status_code == 202
    job = wait_status(client, job_id, {"canceled", "succeeded", "failed"}, 60)
    assert job["status"] == "canceled" and job["outputs"] == []
    assert job["progress"]["step"] < 150
