"""Redis stopped: POST and GET answer 503 with a clear error; after it returns, the same API
process serves again. Uses a redis-server of its own, never the shared one."""

from __future__ import annotations

import pytest
from redis import Redis

from service.app import create_app
from tests.conftest import free_port
from tests.live_stack import ApiServer, wait_for
from tests.service.conftest import OwnRedis, SettingsFactory

pytestmark = pytest.mark.integration

BODY = {"prompt": "outage", "width": 64, "height": 64, "steps": 2}


def test_redis_down_is_503_and_recovers_without_restart(
    own_redis: OwnRedis, settings_for: SettingsFactory
) -> None:
    settings = settings_for(redis_url=own_redis.url)
    with ApiServer(create_app(settings), free_port()) as api, api.client() as client:
        before = client.post("/v1/generations", json=BODY)
        assert before.status_code == 202
        job_id = before.json()["id"]

        own_redis.stop()
        for answer in (
            client.post("/v1/generations", json=BODY),
            client.get(f"/v1/generations/{job_id}"),
            client.post(f"/v1/generations/{job_id}/cancel"),
            client.get("/v1/models"),
            client.get("/autoscaling/demand"),
        ):
            assert answer.status_code == 503, answer.text
            error = answer.json()["error"]
            assert error["code"] == "redis_unavailable"
            assert "Redis" in error["message"]
            assert answer.headers["retry-after"]
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200  # the process itself is fine
        assert "selfcascade_redis_up 0.0" in client.get("/metrics").text
        # Invalid input is still a 422 while Redis is down: validation needs no Redis.
        assert client.post("/v1/generations", json={"prompt": ""}).status_code == 422

        own_redis.start()  # an empty Redis on the same port (no persistence in this test)
        after = wait_for(
            lambda: (r := client.post("/v1/generations", json=BODY)).status_code == 202 and r,
            15,
            "the API to reconnect",
            interval_s=0.2,
        )
        assert client.get(f"/v1/generations/{after.json()['id']}").status_code == 200


def test_a_refused_enqueue_leaves_no_job_behind(
    own_redis: OwnRedis, settings_for: SettingsFactory
) -> None:
    """The record and its RQ enqueue are one MULTI/EXEC transaction: when the enqueue cannot
    happen, neither does the record (no `queued` job that no worker would ever run)."""
    admin = Redis.from_url(own_redis.url)
    # A real refusal inside the transaction: this API user may not push onto lists (RQ's
    # enqueue), so Redis aborts the whole EXEC (EXECABORT) and applies none of it.
    admin.execute_command("ACL", "SETUSER", "api", "on", ">secret", "~*", "&*", "+@all", "-rpush",
                          "-lpush")
    url = own_redis.url.replace("redis://", "redis://api:secret@")
    settings = settings_for(redis_url=url, max_active_jobs_per_key=4)
    with ApiServer(create_app(settings), free_port()) as api, api.client() as client:
        answer = client.post("/v1/generations", json=BODY)
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "redis_unavailable"
    prefix = settings.redis_prefix
    assert admin.keys(f"{prefix}:job:*") == [] and admin.keys(f"{prefix}:events:*") == []
    assert admin.keys("rq:job:*") == []
    # The active slot the request reserved was given back.
    assert all(admin.scard(key) == 0 for key in admin.keys(f"{prefix}:active:*"))
