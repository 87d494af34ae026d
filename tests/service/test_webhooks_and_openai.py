"""Webhooks and the OpenAI-compatible route against the real thing: uvicorn, a worker
subprocess, the webhook delivery loop, a loopback HTTP receiver and the official `openai` client.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image
from redis import Redis

from contract.keys import RedisKeys
from contract.queueing import generation_queue
from contract.settings import Settings
from contract.state import JobStore
from contract.webhook_queue import WebhookDelivery
from service.app import create_app
from service.webhook_delivery import WebhookSender
from service.webhook_worker import WebhookDispatcher
from tests.conftest import free_port
from tests.live_stack import ApiServer, WorkerProcess, wait_for
from tests.service.conftest import make_settings

pytestmark = pytest.mark.integration

SECRET = "whsec-test-0123456789"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
JOB = {"prompt": "a lighthouse", "width": 128, "height": 128, "steps": 4}
SMALL = {"prompt": "a buoy", "width": 64, "height": 64, "steps": 2}


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int


@dataclass
class Receiver:
    """A loopback webhook receiver; each path answers the statuses scripted for it, then 200."""

    url: str
    script: dict[str, list[int]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)

    def on(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    port = free_port()
    state = Receiver(url=f"http://127.0.0.1:{port}")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            planned = state.script.get(self.path, [])
            status = planned.pop(0) if planned else 200
            headers = {k.lower(): v for k, v in self.headers.items()}
            state.received.append(Received(self.path, headers, body, status))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()


@dataclass
class Stack:
    settings: Settings
    api: ApiServer
    worker: WorkerProcess
    client: httpx.Client


@pytest.fixture(scope="module")
def stack(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("webhooks")
    port = free_port()
    settings = make_settings(
        redis_url,
        f"t{uuid.uuid4().hex[:10]}",
        data,
        tiny_model_dir,
        port=port,
        webhook_secret=SECRET,
        webhook_allowed_networks="127.0.0.0/8",
        webhook_allow_http=True,
        webhook_backoff_s=0.2,
        openai_wait_s=120,
    )
    redis = Redis.from_url(redis_url)
    worker = WorkerProcess(settings, "webhooks-1", data).start()
    dispatcher = WebhookDispatcher(settings, threads=2)
    dispatcher.start_thread()
    try:
        worker.wait_ready(redis)
        with ApiServer(create_app(settings), port) as api, api.client() as client:
            yield Stack(settings, api, worker, client)
    finally:
        dispatcher.stop.set()
        worker.stop()
        redis.close()


def valid_signature(hook: Received) -> bool:
    message_id, timestamp = hook.headers["webhook-id"], hook.headers["webhook-timestamp"]
    signed = f"{message_id}.{timestamp}.".encode() + hook.body
    expected = base64.b64encode(hmac.new(SECRET.encode(), signed, hashlib.sha256).digest())
    scheme, _, signature = hook.headers["webhook-signature"].partition(",")
    return scheme == "v1" and hmac.compare_digest(signature.encode(), expected)


def test_filtered_events_arrive_signed_with_the_get_body_and_trace(
    stack: Stack, receiver: Receiver
) -> None:
    body = {
        **JOB,
        "webhook": f"{receiver.url}/filtered",
        "webhook_events_filter": ["start", "completed"],
        "metadata": {"order": "A-1234", "customer": "ada"},
    }
    headers = {"X-Request-ID": "hook-req-1", "traceparent": TRACEPARENT}
    job = stack.client.post("/v1/generations", json=body, headers=headers).json()

    def completed() -> list[Received]:
        hooks = receiver.on("/filtered")
        return [h for h in hooks if h.headers["x-selfcascade-event"] == "completed"]

    [done] = wait_for(completed, 120, "the completed webhook", 0.1)
    time.sleep(0.5)  # progress events, were any wrongly sent, would be queued by now
    hooks = receiver.on("/filtered")
    assert sorted(h.headers["x-selfcascade-event"] for h in hooks) == ["completed", "start"]
    for hook in hooks:
        assert valid_signature(hook)
        assert abs(int(hook.headers["webhook-timestamp"]) - time.time()) < 60
        assert hook.headers["x-request-id"] == "hook-req-1"
        assert hook.headers["traceparent"] == TRACEPARENT
        assert json.loads(hook.body)["id"] == job["id"]
    assert len({h.headers["webhook-id"] for h in hooks}) == 2
    # Each body is the job as of its event, even when sent later.
    [start] = [h for h in hooks if h.headers["x-selfcascade-event"] == "start"]
    assert json.loads(start.body)["status"] == "running"
    assert json.loads(start.body)["metadata"] == body["metadata"]
    final = stack.client.get(f"/v1/generations/{job['id']}").json()
    assert json.loads(done.body) == final
    assert final["status"] == "succeeded"
    # The worker's logs carry the request id of the HTTP request that created the job.
    assert "request_id=hook-req-1" in stack.worker.log()


def test_a_failing_receiver_gets_the_completed_event_once_it_recovers(
    stack: Stack, receiver: Receiver
) -> None:
    receiver.script["/flaky"] = [500, 500]
    job = stack.client.post(
        "/v1/generations", json={**JOB, "webhook": f"{receiver.url}/flaky"}
    ).json()
    wait_for(lambda: any(h.answered == 200 for h in receiver.on("/flaky")), 120, "recovery", 0.1)
    hooks = receiver.on("/flaky")
    assert [h.answered for h in hooks] == [500, 500, 200]
    assert len({h.headers["webhook-id"] for h in hooks}) == 1  # one message, retried
    assert len({h.body for h in hooks}) == 1
    assert all(valid_signature(h) for h in hooks)
    assert json.loads(hooks[-1].body)["id"] == job["id"]
    assert json.loads(hooks[-1].body)["status"] == "succeeded"
    metrics = stack.client.get("/metrics").text
    assert 'selfcascade_webhook_deliveries_total{outcome="retried"}' in metrics


def test_delivery_rechecks_the_address_and_refuses_loopback_without_the_allow_list(
    stack: Stack, receiver: Receiver, redis_client: Redis
) -> None:
    job = stack.client.post("/v1/generations", json=SMALL).json()
    strict = stack.settings.model_copy(update={"webhook_allowed_networks": ""})
    with closing(WebhookSender(strict, redis_client)) as sender:
        delivery = WebhookDelivery(
            id="msg_x", job_id=job["id"], event="completed", url=f"{receiver.url}/strict"
        )
        assert sender.deliver(delivery) == "refused"
    assert receiver.on("/strict") == []


def test_prefer_wait_is_capped_at_sixty_seconds(stack: Stack) -> None:
    response = stack.client.post(
        "/v1/generations", json=SMALL, headers={"Prefer": "wait=1000"}, timeout=90
    )
    assert response.status_code == 200, response.text
    assert response.headers["preference-applied"] == "wait=60"
    assert response.json()["status"] == "succeeded"


def openai_client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{stack.api.url}/v1", api_key="unused-in-open-mode", max_retries=0, timeout=120
    )


def test_openai_client_gets_a_b64_image_of_the_requested_size(stack: Stack) -> None:
    result = openai_client(stack).images.generate(
        model="tiny",
        prompt="a red fox",
        size="128x128",  # type: ignore[arg-type]
        response_format="b64_json",
        user="end-user-7",
        quality="high",  # OpenAI's, accepted without effect
        extra_body={"steps": 4, "seed": 11, "negative_prompt": "blur", "guidance_scale": 5.0},
    )
    assert result.created > 0
    [image] = result.data or []
    assert image.b64_json is not None
    decoded = Image.open(io.BytesIO(base64.b64decode(image.b64_json)))
    assert decoded.size == (128, 128)


def test_openai_client_gets_n_urls(stack: Stack) -> None:
    result = openai_client(stack).images.generate(
        prompt="two boats",
        n=2,
        size="64x64",  # type: ignore[arg-type]
        response_format="url",
        extra_body={"steps": 2, "method": "direct", "seed": 5, "safety_identifier": "u-1"},
    )
    urls = [d.url for d in result.data or []]
    assert len(urls) == 2 and len(set(urls)) == 2
    images = [stack.client.get(str(url)) for url in urls]
    assert all(r.status_code == 200 for r in images)
    assert {Image.open(io.BytesIO(r.content)).size for r in images} == {(64, 64)}
    assert images[0].content != images[1].content  # seeds 5 and 6


def test_openai_errors_come_in_openai_shape(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client(stack).images.generate(prompt="x", size="wide")  # type: ignore[arg-type]
    error = raised.value.response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "size"
    assert error["code"] == "invalid_request" and error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as raised:  # a typo never runs the defaults
        openai_client(stack).images.generate(prompt="x", extra_body={"stepz": 2})
    assert raised.value.response.json()["error"]["param"] == "stepz"
    with pytest.raises(openai.BadRequestError) as raised:  # a native field, the native rules
        openai_client(stack).images.generate(prompt="x", extra_body={"tuned": True})
    error = raised.value.response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "tuned")
    assert error["message"] == "tuned: model tiny has no tuned upsamplers; use false or auto"
    with pytest.raises(openai.BadRequestError) as raised:  # named as this request names it
        openai_client(stack).images.generate(prompt="x", size="100x64")  # type: ignore[arg-type]
    error = raised.value.response.json()["error"]
    assert (error["param"], error["message"]) == (
        "size", "size (width): must be a multiple of 8 px for model tiny, got 100"
    )


def test_openai_client_sends_the_native_fields_as_extra_body(
    stack: Stack, receiver: Receiver
) -> None:
    native = {
        "steps": 4, "seed": 21, "negative_prompt": "blur", "guidance_scale": 6,
        "method": "self_cascade", "tuned": False, "pivot_strength": 0.5, "scheduler": "euler",
        "upsample_mode": "bicubic", "lr_features": "per_stage", "priority": "batch",
        "webhook": f"{receiver.url}/openai", "webhook_events_filter": ["start", "completed"],
        "metadata": {"order": "B-77", "customer": "ada"},
    }
    result = openai_client(stack).images.generate(
        prompt="a lantern", n=2, size="128x128", response_format="url",  # type: ignore[arg-type]
        extra_body=native,
    )
    # Each image is an ordinary generation, its id in its URL: .../v1/generations/<id>/outputs/0
    ids = [str(d.url).split("/")[-3] for d in result.data or []]
    assert len(set(ids)) == 2
    jobs = [stack.client.get(f"/v1/generations/{job_id}").json() for job_id in ids]
    for job, seed in zip(jobs, (21, 22), strict=True):
        assert job["status"] == "succeeded"
        assert job["metadata"] == native["metadata"]
        assert (job["priority"], job["webhook"]) == ("batch", native["webhook"])
        assert job["webhook_events_filter"] == ["completed", "start"]
        params = job["params"]
        assert params["seed"] == seed and (params["width"], params["height"]) == (128, 128)
        for name in (
            "steps", "negative_prompt", "guidance_scale", "method", "tuned", "pivot_strength",
            "scheduler", "upsample_mode", "lr_features",
        ):
            assert params[name] == native[name], name

    def completed() -> set[str]:
        hooks = receiver.on("/openai")
        return {
            json.loads(h.body)["id"] for h in hooks
            if h.headers["x-selfcascade-event"] == "completed"
        }

    assert wait_for(lambda: completed() == set(ids), 60, "both completed webhooks", 0.1)
    hooks = receiver.on("/openai")
    assert all(json.loads(h.body)["metadata"] == native["metadata"] for h in hooks)
    assert {h.headers["x-selfcascade-event"] for h in hooks} == {"start", "completed"}


def test_metrics_use_inference_server_names(stack: Stack) -> None:
    text = stack.client.get("/metrics").text
    for name in (
        "selfcascade_request_queue_time_seconds_bucket",
        "selfcascade_request_inference_time_seconds_bucket",
        "selfcascade_e2e_request_latency_seconds_bucket",
        'selfcascade_num_requests_waiting{model="tiny",priority="interactive"}',
        "selfcascade_num_requests_running",
        'selfcascade_request_success_total{status="succeeded"}',
    ):
        assert name in text, name
    assert "selfcascade_e2e_request_latency_seconds_count 0.0" not in text


def test_job_store_keeps_the_origin(stack: Stack, redis_client: Redis) -> None:
    job = stack.client.post(
        "/v1/generations", json={**SMALL, "priority": "batch"}
    ).json()
    store = JobStore(redis_client, RedisKeys(stack.settings.redis_prefix), 60)
    record = store.get(job["id"])
    assert record is not None and record.origin.priority == "batch"


def test_an_openai_request_that_times_out_cancels_its_queued_jobs(
    redis_url: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    # A prefix no worker serves: the jobs stay queued until the route gives up on them.
    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = make_settings(redis_url, prefix, tmp_path, tiny_model_dir, openai_wait_s=0.5)
    with ApiServer(create_app(settings), free_port()) as api, api.client() as client:
        answer = client.post(
            "/v1/images/generations", json={"prompt": "slow", "size": "64x64", "n": 2}
        )
    assert answer.status_code == 504, answer.text
    redis = Redis.from_url(redis_url)
    ids = [key.decode().split(":")[-1] for key in redis.keys(f"{prefix}:job:*")
           if key.decode().count(":") == 2]
    assert len(ids) == 2
    for job_id in ids:
        assert redis.hget(f"{prefix}:job:{job_id}", "status") == b"canceled"
        assert not redis.exists(f"rq:job:{job_id}")
    assert redis.llen(generation_queue(redis, settings, "tiny").key) == 0
