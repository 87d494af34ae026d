"""Redis loses one reply, or the link drops for a second: a request that already made its job
answers with it, a retry never makes a second one, and a cancel finishes on its retry.

A proxy between the API and the test Redis injects the faults (tests/service/redis_faults.py).
No worker runs: jobs stay queued.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from redis import Redis
from rq.job import Job

from contract import histograms
from contract.keys import RedisKeys
from contract.queueing import generation_queues
from contract.settings import Settings
from service.app import create_app
from tests.conftest import free_port
from tests.live_stack import ApiServer
from tests.service.conftest import SettingsFactory
from tests.service.redis_faults import FlakyRedisProxy

pytestmark = pytest.mark.integration

BODY = {"prompt": "a harbour", "width": 64, "height": 64, "steps": 2}


@pytest.fixture
def proxy(redis_url: str) -> Iterator[FlakyRedisProxy]:
    flaky = FlakyRedisProxy(redis_url)
    yield flaky
    flaky.close()


def job_ids(redis: Redis, settings: Settings) -> list[str]:
    prefix = f"{settings.redis_prefix}:job:"
    keys = (key.decode() for key in redis.scan_iter(match=f"{prefix}*"))
    return sorted(k.removeprefix(prefix) for k in keys if ":" not in k.removeprefix(prefix))


def queued_ids(redis: Redis, settings: Settings) -> list[str]:
    queues = generation_queues(redis, settings, ["tiny"])
    return [job_id for queue in queues for job_id in queue.get_job_ids()]


def blip(proxy: FlakyRedisProxy, after_s: float, lasting_s: float) -> None:
    threading.Timer(after_s, proxy.cut).start()
    threading.Timer(after_s + lasting_s, proxy.restore).start()


def test_a_lost_reply_to_the_create_transaction_is_the_job_not_a_503(
    proxy: FlakyRedisProxy, settings_for: SettingsFactory, redis_client: Redis
) -> None:
    settings = settings_for(redis_url=proxy.url)
    headers = {"Idempotency-Key": "order-7"}
    with ApiServer(create_app(settings), free_port()) as api, api.client() as client:
        proxy.lose_reply_to(b"EXEC", b"rq:queue:")  # Redis runs the transaction; no answer
        first = client.post("/v1/generations", json=BODY, headers=headers)
        assert first.status_code == 202, first.text  # it asked Redis, which had made the job
        again = client.post("/v1/generations", json=BODY, headers=headers)
        assert again.json()["id"] == first.json()["id"]
    made = [first.json()["id"]]
    assert job_ids(redis_client, settings) == made
    assert queued_ids(redis_client, settings) == made


def test_a_redis_blip_while_a_request_waits_still_answers_with_its_job(
    proxy: FlakyRedisProxy, settings_for: SettingsFactory, redis_client: Redis
) -> None:
    settings = settings_for(redis_url=proxy.url)
    with ApiServer(create_app(settings), free_port()) as api, api.client() as client:
        blip(proxy, 0.5, 1.0)
        answer = client.post("/v1/generations", json=BODY, headers={"Prefer": "wait=3"})
        # Not a 503 (which a client retries into a second job): the job, to poll.
        assert answer.status_code == 202, answer.text
        assert answer.headers["location"] == f"{api.url}/v1/generations/{answer.json()['id']}"
    assert job_ids(redis_client, settings) == [answer.json()["id"]]


def test_the_openai_route_waits_through_a_blip_and_cancels_at_its_deadline(
    proxy: FlakyRedisProxy, settings_for: SettingsFactory, redis_client: Redis
) -> None:
    settings = settings_for(redis_url=proxy.url, openai_wait_s=3)
    with ApiServer(create_app(settings), free_port()) as api, api.client() as client:
        blip(proxy, 0.5, 1.0)
        body = {"prompt": "a harbour", "size": "64x64", "n": 2}
        answer = client.post("/v1/images/generations", json=body)
    # OpenAI's client retries a 5xx by itself: a 503 here would queue two more jobs per retry.
    assert answer.status_code == 504, answer.text
    made = job_ids(redis_client, settings)
    assert len(made) == 2
    statuses = {redis_client.hget(f"{settings.redis_prefix}:job:{j}", "status") for j in made}
    assert statuses == {b"canceled"}


def test_a_cancel_whose_reply_was_lost_is_finished_by_its_retry(
    proxy: FlakyRedisProxy, settings_for: SettingsFactory, redis_client: Redis
) -> None:
    settings = settings_for(
        redis_url=proxy.url, webhook_secret="s3cret", webhook_allowed_networks="127.0.0.0/8"
    )
    keys = RedisKeys(settings.redis_prefix)
    with ApiServer(create_app(settings), free_port()) as api, api.client() as client:
        body = {**BODY, "webhook": "https://127.0.0.1:9/hook"}
        job_id = client.post("/v1/generations", json=body).json()["id"]
        # The status change runs (one script, with the job's id), its answer is lost, and Redis
        # stays away longer than the route tries again.
        proxy.lose_reply_to(b"EVALSHA", job_id.encode(), b"canceled", then_refuse=True)
        lost = client.post(f"/v1/generations/{job_id}/cancel")
        assert lost.status_code == 503, lost.text
        proxy.restore()
        retried = client.post(f"/v1/generations/{job_id}/cancel")
        assert retried.status_code == 200 and retried.json()["status"] == "canceled"
        # A third time changes nothing more.
        assert client.post(f"/v1/generations/{job_id}/cancel").status_code == 200
    # What the first call never got to do, the retry did, once.
    assert queued_ids(redis_client, settings) == []
    assert not redis_client.exists(Job.key_for(job_id))
    assert redis_client.zcard(keys.webhooks()) == 1
    assert histograms.read_counts(redis_client, keys, histograms.JOBS_FINISHED) == {"canceled": 1}


def test_the_openai_deadline_cancels_its_jobs_even_while_redis_is_away(
    proxy: FlakyRedisProxy, settings_for: SettingsFactory, redis_client: Redis
) -> None:
    settings = settings_for(redis_url=proxy.url, openai_wait_s=2)
    with ApiServer(create_app(settings), free_port()) as api, api.client() as client:
        blip(proxy, 0.5, 4.0)  # still away at the deadline, back 2.5 s later
        answer = client.post("/v1/images/generations", json={"prompt": "x", "n": 2}, timeout=30)
    assert answer.status_code == 504, answer.text
    made = job_ids(redis_client, settings)
    statuses = {redis_client.hget(f"{settings.redis_prefix}:job:{j}", "status") for j in made}
    assert len(made) == 2 and statuses == {b"canceled"}


def test_a_cancel_whose_reply_was_lost_for_an_instant_ends_the_job_in_the_same_request(
    proxy: FlakyRedisProxy, settings_for: SettingsFactory, redis_client: Redis
) -> None:
    settings = settings_for(redis_url=proxy.url)
    keys = RedisKeys(settings.redis_prefix)
    with ApiServer(create_app(settings), free_port()) as api, api.client() as client:
        job_id = client.post("/v1/generations", json=BODY).json()["id"]
        proxy.lose_reply_to(b"EVALSHA", job_id.encode(), b"canceled")
        answer = client.post(f"/v1/generations/{job_id}/cancel")
    assert answer.status_code == 202 and answer.json()["status"] == "canceled"
    assert proxy.faults == 1
    assert queued_ids(redis_client, settings) == []
    assert histograms.read_counts(redis_client, keys, histograms.JOBS_FINISHED) == {"canceled": 1}
