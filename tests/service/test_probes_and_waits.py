"""The API under load and odd input: a /metrics scrape leaves RQ's started registry to the reaper,
requests that wait on their jobs cannot starve the probes, and a malformed Last-Event-ID is a 422.
Real uvicorn and Redis, no worker: jobs stay queued on purpose."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import anyio
import httpx
import pytest
from redis import Redis
from rq.registry import StartedJobRegistry
from starlette.types import ASGIApp, Receive, Scope, Send

from service.app import create_app
from tests.conftest import free_port
from tests.live_stack import ApiServer, wait_for
from tests.service.conftest import SettingsFactory

pytestmark = pytest.mark.integration

BODY = {"prompt": "a harbour", "width": 64, "height": 64, "steps": 2}
WAIT = {"Prefer": "wait=60"}


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error: dict = response.json()["error"]
    assert error["code"] == code and error["message"]
    return error


def test_a_scrape_leaves_an_expired_started_entry_to_the_reaper(
    settings_for: SettingsFactory, redis_client: Redis
) -> None:
    app = create_app(settings_for())
    registry = StartedJobRegistry(queue=app.state.services.queue_for("tiny", "interactive"))
    # A worker that died mid-job: its lease ran out a minute ago and the reaper has not run yet.
    # RQ's own cleanup would drop the entry (and fail the job without our handlers).
    entry = f"{uuid.uuid4().hex}:{uuid.uuid4().hex}"  # job id:execution id, as RQ writes it
    redis_client.zadd(registry.key, {entry: time.time() - 60})
    with ApiServer(app, free_port()) as server, server.client() as client:
        metrics = client.get("/metrics").text
    assert 'selfcascade_jobs{status="running"} 1.0' in metrics
    assert redis_client.zscore(registry.key, entry) is not None


def with_thread_pool(app: ASGIApp, threads: int) -> ASGIApp:
    """`app` with the event loop's shared worker-thread pool cut to `threads` (AnyIO's is 40)."""

    async def run(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # once, on the server's event loop
            anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        await app(scope, receive, send)

    return run


def test_full_wait_slots_leave_the_probes_free_and_refuse_more_waits_at_once(
    settings_for: SettingsFactory,
) -> None:
    app = create_app(settings_for(max_waiting_requests=2))
    limiter = app.state.wait_limiter
    # As many threads as wait slots: two waits that each held a thread would starve every
    # sync route, as 40 waits did in production with AnyIO's 40.
    server_app = with_thread_pool(app, 2)
    with ApiServer(server_app, free_port()) as server, server.client() as client:

        def post_and_wait(_: int) -> httpx.Response:
            with httpx.Client(base_url=server.url, timeout=90) as c:
                return c.post("/v1/generations", json=BODY, headers=WAIT)

        with ThreadPoolExecutor(2) as pool:
            waits = [pool.submit(post_and_wait, i) for i in range(2)]
            wait_for(lambda: limiter.borrowed_tokens == 2, 30, "two requests waiting")

            assert client.get("/healthz").json() == {"status": "ok"}
            assert_error(client.get("/readyz"), 503, "model_unavailable")  # no worker, answered
            # A third wait is not queued behind the two: its 202 comes at once, unapplied.
            extra = client.post("/v1/generations", json=BODY, headers=WAIT)
            assert extra.status_code == 202, extra.text
            assert "preference-applied" not in extra.headers
            # The OpenAI route must wait to answer, so it is refused before making any job.
            queue = app.state.services.queue_for("tiny", "interactive")
            before = queue.count
            refused = client.post("/v1/images/generations", json={"prompt": "busy"})
            error = assert_error(refused, 429, "queue_full")
            assert error["type"] == "rate_limit_error"  # OpenAI's shape on its route
            assert int(refused.headers["retry-after"]) > 0
            assert queue.count == before
            assert not any(w.done() for w in waits)  # all of the above ran while both waited

            # Canceling their jobs ends both waits, which answer with the final state.
            extra_id = extra.json()["id"]
            for job_id in queue.job_ids:
                if job_id != extra_id:
                    assert client.post(f"/v1/generations/{job_id}/cancel").status_code == 202
            answers = [w.result() for w in waits]
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        assert {a.json()["status"] for a in answers} == {"canceled"}
        assert all(a.headers["preference-applied"] == "wait=60" for a in answers)
        assert limiter.borrowed_tokens == 0


def test_a_malformed_last_event_id_is_422_before_streaming(settings_for: SettingsFactory) -> None:
    with ApiServer(create_app(settings_for()), free_port()) as server, server.client() as client:
        job_id = client.post("/v1/generations", json=BODY).json()["id"]
        events = f"/v1/generations/{job_id}/events"
        for bad in ("garbage", "1-2-3", "-1", "12.5", "18446744073709551616-0"):
            answer = client.get(events, headers={"Last-Event-ID": bad})
            assert assert_error(answer, 422, "invalid_request")["param"] == "Last-Event-ID"
        # A well-formed id resumes the stream after it.
        with client.stream("GET", events, headers={"Last-Event-ID": "0-0"}) as stream:
            assert stream.status_code == 200
            assert next(stream.iter_lines()).startswith("id: ")


def test_a_prefer_header_it_cannot_read_is_ignored_not_a_500(
    settings_for: SettingsFactory, redis_client: Redis
) -> None:
    settings = settings_for()
    with ApiServer(create_app(settings), free_port()) as server, server.client() as client:
        # Latin-1 0xB2 is "2" superscript: a digit to str.isdigit(), not to int().
        answer = client.post("/v1/generations", json=BODY, headers=[("Prefer", b"wait=\xb2")])
    assert answer.status_code == 202, answer.text
    assert "preference-applied" not in answer.headers
    jobs = [k for k in redis_client.scan_iter(match=f"{settings.redis_prefix}:job:*")]
    assert len([k for k in jobs if k.count(b":") == 2]) == 1


def test_a_stream_resumed_after_its_last_event_ends_at_once(
    settings_for: SettingsFactory,
) -> None:
    with ApiServer(create_app(settings_for()), free_port()) as server, server.client() as client:
        job_id = client.post("/v1/generations", json=BODY).json()["id"]
        client.post(f"/v1/generations/{job_id}/cancel")  # queued: ends at once
        events = f"/v1/generations/{job_id}/events"
        whole = client.get(events).text
        last_id = [line[4:] for line in whole.splitlines() if line.startswith("id: ")][-1]
        # An EventSource reconnects when a stream ends: resumed past the end, nothing is left,
        # and 204 is what tells it to stop.
        resumed = client.get(events, headers={"Last-Event-ID": last_id}, timeout=5)
    assert resumed.status_code == 204 and resumed.text == ""
