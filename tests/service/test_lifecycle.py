"""POST -> a real worker -> GET/SSE -> download; cancel queued and running jobs."""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from redis import Redis

from contract.settings import Settings
from service.app import create_app
from tests.conftest import free_port
from tests.live_stack import ApiServer, WorkerProcess, wait_for, wait_status
from tests.service.conftest import make_settings

pytestmark = pytest.mark.integration

FAST = {"prompt": "a red fox", "width": 128, "height": 128, "steps": 6}
# Cannot finish before the test cancels it, even on an idle machine: at 256 px the tiny UNet
# attends over 64x64 latent tokens (~0.1 s a step, 150 steps); at 64 px it would take ~1 s.
SLOW = {"prompt": "a long one", "width": 256, "height": 256, "steps": 150, "method": "direct"}


class Stack:
    def __init__(self, settings: Settings, api: ApiServer, worker: WorkerProcess) -> None:
        self.settings = settings
        self.api = api
        self.worker = worker
        self.client = api.client()


@pytest.fixture(scope="module")
def stack(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("lifecycle")
    settings = make_settings(redis_url, f"t{uuid.uuid4().hex[:10]}", data, tiny_model_dir)
    redis = Redis.from_url(redis_url)
    worker = WorkerProcess(settings, "lifecycle-1", data).start()
    try:
        worker.wait_ready(redis)
        with ApiServer(create_app(settings), free_port()) as api:
            yield Stack(settings, api, worker)
    finally:
        worker.stop()
        redis.close()


def post(stack: Stack, body: dict) -> dict:
    response = stack.client.post("/v1/generations", json=body)
    assert response.status_code == 202, response.text
    base = str(stack.client.base_url).rstrip("/")
    assert response.headers["location"] == f"{base}/v1/generations/{response.json()['id']}"
    return response.json()  # type: ignore[no-any-return]


def test_generation_runs_to_success_with_monotonic_progress(stack: Stack) -> None:
    created = post(stack, FAST)
    assert created["status"] == "queued"
    assert 0 <= created["params"]["seed"] < 2**32  # random seed, echoed

    seen: list[dict] = []

    def finished() -> bool:
        body = stack.client.get(f"/v1/generations/{created['id']}").json()
        seen.append(body)
        return body["status"] in ("succeeded", "failed", "canceled")

    wait_for(finished, 120, "generation to finish", interval_s=0.02)
    statuses = [b["status"] for b in seen]
    final = seen[-1]
    assert final["status"] == "succeeded", final
    assert "running" in statuses
    # Status only moves forward: queued* running* succeeded.
    order = {"queued": 0, "running": 1, "succeeded": 2}
    assert [order[s] for s in statuses] == sorted(order[s] for s in statuses)
    fractions = [b["progress"]["fraction"] for b in seen if b["progress"]]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert final["progress"]["stages"] == 2  # 128 px from a 64 px model: one re-noise stage
    assert (final["progress"]["width"], final["progress"]["height"]) == (128, 128)
    assert final["metrics"]["inference_s"] > 0
    assert len(final["metrics"]["stage_seconds"]) == 2
    assert final["metrics"]["stage_sizes"] == [[64, 64], [128, 128]]

    [output] = final["outputs"]
    download = stack.client.get(output["url"])
    assert download.status_code == 200
    assert download.headers["content-type"] == "image/png"
    assert hashlib.sha256(download.content).hexdigest() == output["sha256"]
    image = Image.open(io.BytesIO(download.content))
    assert image.size == (128, 128) == (output["width"], output["height"])


def read_sse(client: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    events: list[tuple[str, dict]] = []
    with client.stream("GET", f"/v1/generations/{job_id}/events", timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: ") and name:
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_sse_streams_the_same_lifecycle(stack: Stack) -> None:
    created = post(stack, {**FAST, "seed": 7})
    events = read_sse(stack.client, created["id"])  # returns once a terminal event arrives
    names = [n for n, _ in events]
    assert names[0] == "queued" and names[1] == "started" and names[-1] == "succeeded"
    assert set(names[2:-1]) == {"progress"}
    fractions = [e["progress"]["fraction"] for n, e in events if n == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    # A late subscriber replays the same sequence from the stream.
    assert [n for n, _ in read_sse(stack.client, created["id"])] == names
    final = stack.client.get(f"/v1/generations/{created['id']}").json()
    assert final["status"] == "succeeded" and final["params"]["seed"] == 7


def test_cancel_queued_and_running_then_worker_takes_next_job(stack: Stack) -> None:
    running = post(stack, SLOW)
    queued = post(stack, SLOW)
    wait_for(
        lambda: stack.client.get(f"/v1/generations/{running['id']}").json()["progress"],
        120, "the first job to make progress",
    )
    assert stack.client.get(f"/v1/generations/{queued['id']}").json()["queue_position"] == 0

    answer = stack.client.post(f"/v1/generations/{queued['id']}/cancel")
    assert answer.status_code == 202
    assert answer.json()["status"] == "canceled"  # a queued job is canceled at once
    # ... and leaves the RQ queue and Redis: no worker will dequeue it.
    rq_redis = Redis.from_url(stack.settings.redis_url or "")
    assert not rq_redis.exists(f"rq:job:{queued['id']}")

    answer = stack.client.post(f"/v1/generations/{running['id']}/cancel")
    assert answer.status_code == 202
    final = wait_status(stack.client, running["id"], {"canceled", "failed", "succeeded"}, 60)
    assert final["status"] == "canceled"
    assert final["progress"]["fraction"] < 1.0

    after = post(stack, FAST)
    assert wait_status(stack.client, after["id"], {"succeeded", "failed"}, 120)["status"] == (
        "succeeded"
    )
    never_ran = stack.client.get(f"/v1/generations/{queued['id']}").json()
    assert never_ran["status"] == "canceled" and never_ran["attempts"] == 0
    # Canceling again is harmless; canceling a finished job is a conflict.
    assert stack.client.post(f"/v1/generations/{queued['id']}/cancel").status_code == 200
    conflict = stack.client.post(f"/v1/generations/{after['id']}/cancel")
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "conflict"


def test_operations_endpoints(stack: Stack) -> None:
    assert stack.client.get("/healthz").json() == {"status": "ok"}
    ready = stack.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["workers"] >= 1
    models = stack.client.get("/v1/models").json()["data"]
    assert models[0]["name"] == "tiny" and models[0]["loaded_by_workers"] == 1
    metrics = stack.client.get("/metrics").text
    assert "selfcascade_queue_depth" in metrics
    assert 'selfcascade_jobs_finished_total{status="succeeded"}' in metrics
    assert "selfcascade_inference_seconds_bucket" in metrics
    assert 'selfcascade_http_requests_total{method="GET",route="/healthz",status="200"}' in metrics
    assert stack.client.get("/docs").status_code == 200
    assert stack.client.get("/openapi.json").json()["paths"]["/v1/generations"]


def test_unknown_ids_answer_404(stack: Stack) -> None:
    for path in (
        "/v1/generations/" + "0" * 32,
        "/v1/generations/not-an-id",
        "/v1/generations/" + "0" * 32 + "/events",
        "/v1/generations/" + "0" * 32 + "/outputs/0",
    ):
        answer = stack.client.get(path)
        assert answer.status_code == 404, path
        assert answer.json()["error"]["code"] == "not_found"
    assert stack.client.post("/v1/generations/" + "0" * 32 + "/cancel").status_code == 404


def test_idempotency_key_replays_and_conflicts(stack: Stack) -> None:
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    body = {**FAST, "steps": 2, "seed": 1}
    first = stack.client.post("/v1/generations", json=body, headers=headers)
    again = stack.client.post("/v1/generations", json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = stack.client.post("/v1/generations", json={**body, "seed": 2}, headers=headers)
    assert other.status_code == 409
    assert other.json()["error"]["param"] == "Idempotency-Key"
    wait_status(stack.client, first.json()["id"], {"succeeded"}, 120)


def test_prefer_wait_returns_the_finished_generation(stack: Stack) -> None:
    answer = stack.client.post(
        "/v1/generations", json={**FAST, "steps": 2}, headers={"Prefer": "wait=60"}, timeout=90
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["preference-applied"] == "wait=60"
    assert answer.json()["status"] == "succeeded" and answer.json()["outputs"]


def test_local_downloads_answer_ranges_heads_and_conditional_requests(stack: Stack) -> None:
    created = post(stack, {**FAST, "steps": 3})
    [output] = wait_status(stack.client, created["id"], {"succeeded"}, 120)["outputs"]
    url, etag = output["url"], f'"{output["sha256"]}"'
    whole = stack.client.get(url)
    assert whole.headers["etag"] == etag and whole.headers["accept-ranges"] == "bytes"

    # A browser seeking in a clip (and Safari playing one at all) asks for byte ranges.
    part = stack.client.get(url, headers={"Range": "bytes=8-15"})
    assert part.status_code == 206
    assert part.content == whole.content[8:16]
    assert part.headers["content-range"] == f"bytes 8-15/{output['bytes']}"
    unsatisfiable = stack.client.get(url, headers={"Range": f"bytes={output['bytes'] + 10}-"})
    assert unsatisfiable.status_code == 416
    assert unsatisfiable.headers["content-range"] == f"bytes */{output['bytes']}"
    assert unsatisfiable.json()["error"]["param"] == "Range"  # the API's error shape
    # A Range it cannot use (another unit, a reversed span) is ignored: the whole file.
    for ignored in ("items=0-1", "bytes=15-8"):
        answer = stack.client.get(url, headers={"Range": ignored})
        assert answer.status_code == 200 and answer.content == whole.content, ignored

    head = stack.client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == output["bytes"]
    cached = stack.client.get(url, headers={"If-None-Match": f'W/"other", {etag}'})
    assert cached.status_code == 304 and cached.headers["etag"] == etag
    assert stack.client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200


def test_output_urls_use_the_public_base_url_behind_a_proxy(stack: Stack) -> None:
    # Behind a TLS ingress the request reaches the API as plain http: links built from it
    # would send clients (and their API keys) to http://.
    public = "https://selfcascade.example.com"
    settings = stack.settings.model_copy(update={"public_base_url": public + "/"})
    created = post(stack, {**FAST, "steps": 3})
    wait_status(stack.client, created["id"], {"succeeded"}, 120)
    with ApiServer(create_app(settings), free_port()) as proxied:
        [output] = proxied.client().get(f"/v1/generations/{created['id']}").json()["outputs"]
    assert output["url"] == f"{public}/v1/generations/{created['id']}/outputs/0"


def test_an_idempotency_key_orphaned_by_a_dead_request_is_taken_over(stack: Stack) -> None:
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    body = {**FAST, "steps": 2, "seed": 3}
    first = stack.client.post("/v1/generations", json=body, headers=headers)
    assert first.status_code == 202
    redis = Redis.from_url(stack.settings.redis_url or "")
    [key] = [k for k in redis.scan_iter(f"{stack.settings.redis_prefix}:idem:*")
             if redis.get(k).decode().startswith(first.json()["id"])]  # type: ignore[union-attr]
    # Never longer than the job record it names can live.
    assert 0 < redis.ttl(key) <= stack.settings.result_ttl_s

    # As an API that died between claiming the key and creating the job leaves it: a claim
    # naming a job that never came to exist, made a minute ago.
    _, fingerprint, _ = redis.get(key).decode().split(":")  # type: ignore[union-attr]
    redis.set(key, f"{'0' * 32}:{fingerprint}:{time.time() - 60:.3f}", ex=3600)
    replay = stack.client.post("/v1/generations", json=body, headers=headers)
    assert replay.status_code == 202, replay.text  # not a 409 "retry" for a day
    assert replay.json()["id"] not in ("0" * 32, first.json()["id"])
    again = stack.client.post("/v1/generations", json=body, headers=headers)
    assert again.json()["id"] == replay.json()["id"]  # the new claim holds
    redis.close()
    wait_status(stack.client, replay.json()["id"], {"succeeded"}, 120)


def test_autoscaling_demand_counts_running_and_waiting_jobs_of_every_priority(
    stack: Stack,
) -> None:
    """KEDA's metrics-api trigger scales the pool on this: a busy worker with an empty queue
    still counts, and both priorities add up into one number."""

    def demand(**params: object) -> httpx.Response:
        return stack.client.get("/autoscaling/demand", params=params)

    running = post(stack, SLOW)
    waiting = post(stack, {**SLOW, "priority": "batch"})
    wait_for(
        lambda: stack.client.get(f"/v1/generations/{running['id']}").json()["progress"],
        120, "the first job to make progress",
    )
    expected = {"models": ["tiny"], "waiting": 1, "running": 1, "in_flight": 2}
    assert demand().json() == expected  # default: every model in the models file
    assert demand(model="tiny").json() == expected
    assert demand(model=["tiny", "tiny"]).json() == expected

    unknown = demand(model=["tiny", "sdxl"])
    assert unknown.status_code == 422
    assert unknown.json()["error"]["param"] == "model"
    assert "sdxl" in unknown.json()["error"]["message"]

    for job in (waiting, running):
        assert stack.client.post(f"/v1/generations/{job['id']}/cancel").status_code == 202
    wait_status(stack.client, running["id"], {"canceled", "failed", "succeeded"}, 60)
    wait_for(lambda: demand().json()["in_flight"] == 0, 30, "the pool to have nothing in flight")
