"""Event streams at scale and at shutdown: open streams never take the connections status reads
need, past the limit a new stream is a clear 503, and a stopping API ends its streams and waits
instead of living on until their jobs end. Real uvicorn and Redis, no worker: jobs stay queued."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
import redis.exceptions
from redis import Redis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio import Redis as AsyncRedis

from service.app import create_app
from service.errors import pool_exhausted
from tests.conftest import free_port
from tests.live_stack import REPO, ApiServer, wait_for
from tests.service.conftest import SettingsFactory

pytestmark = pytest.mark.integration

BODY = {"prompt": "a harbour", "width": 64, "height": 64, "steps": 2}


@asynccontextmanager
async def open_streams(url: str, job_id: str, count: int) -> AsyncIterator[list[httpx.Response]]:
    """`count` event streams of the job, each past its first event, held open together."""
    limits = httpx.Limits(max_connections=count + 8)
    client = httpx.AsyncClient(base_url=url, timeout=30, limits=limits)
    lines: list[AsyncIterator[str]] = []  # held: an iterator dropped closes its response
    async with client, AsyncExitStack() as stack:

        async def open_one() -> httpx.Response:
            response = await stack.enter_async_context(
                client.stream("GET", f"/v1/generations/{job_id}/events")
            )
            assert response.status_code == 200, await response.aread()
            lines.append(response.aiter_lines())
            async for line in lines[-1]:
                if line.startswith("event: queued"):
                    break
            return response

        yield [await open_one() for _ in range(count)]


def test_a_hundred_open_streams_leave_status_reads_and_new_jobs_alone(
    settings_for: SettingsFactory,
) -> None:
    # Streams once shared the status reads' pool of 100 connections: the 100th stream turned
    # every GET into a 503 "the job store (Redis) is unreachable" while Redis was fine.
    app = create_app(settings_for())
    with ApiServer(app, free_port()) as server, server.client() as client:
        job_id = client.post("/v1/generations", json=BODY).json()["id"]

        async def check() -> None:
            async with open_streams(server.url, job_id, 110):
                assert app.state.services.open_event_streams == 110
                for _ in range(3):
                    assert client.get(f"/v1/generations/{job_id}").status_code == 200
                assert client.post("/v1/generations", json=BODY).status_code == 202

        anyio.run(check)


def test_streams_past_the_limit_are_a_503_and_a_closed_one_frees_its_place(
    settings_for: SettingsFactory,
) -> None:
    app = create_app(settings_for(max_event_streams=2))
    services = app.state.services
    with ApiServer(app, free_port()) as server, server.client() as client:
        job_id = client.post("/v1/generations", json=BODY).json()["id"]

        async def check() -> None:
            async with open_streams(server.url, job_id, 2):
                refused = client.get(f"/v1/generations/{job_id}/events")
                assert refused.status_code == 503
                assert refused.headers["retry-after"] == "5"
                error = refused.json()["error"]
                assert error["code"] == "server_busy"
                assert "limit of 2 open event streams; poll GET" in error["message"]
                assert client.get(f"/v1/generations/{job_id}").status_code == 200
            # The server notices the closed streams at its next look (a second at most).
            wait_for(lambda: services.open_event_streams == 0, 10, "the streams to be let go")
            async with open_streams(server.url, job_id, 2):
                pass

        anyio.run(check)


def test_a_burst_of_streams_gets_no_more_than_the_limit(settings_for: SettingsFactory) -> None:
    # The check and the count were an await apart: 40 at once got 22 streams past a limit of 2.
    app = create_app(settings_for(max_event_streams=2))
    services = app.state.services
    with ApiServer(app, free_port()) as server, server.client() as client:
        job_id = client.post("/v1/generations", json=BODY).json()["id"]

        async def check() -> None:
            limits = httpx.Limits(max_connections=50)
            client = httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits)
            async with client, AsyncExitStack() as stack:

                async def open_one() -> int:
                    # As EventSources reconnecting from a drained replica: with Last-Event-ID.
                    response = await stack.enter_async_context(
                        client.stream(
                            "GET", f"/v1/generations/{job_id}/events",
                            headers={"Last-Event-ID": "1-0"},
                        )
                    )
                    return response.status_code

                codes = await asyncio.gather(*(open_one() for _ in range(40)))
            assert (codes.count(200), codes.count(503)) == (2, 38)

        anyio.run(check)
        wait_for(lambda: services.open_event_streams == 0, 10, "the slots to be given back")


def test_a_drain_leaves_the_openai_routes_wait_and_its_jobs_alone(
    settings_for: SettingsFactory, redis_client: Redis
) -> None:
    # That route has no 202 to answer: a drain that ended its wait canceled its jobs and
    # answered a 504 "not ready within 60s" two seconds in, on every rollout.
    app = create_app(settings_for())
    services = app.state.services
    with ApiServer(app, free_port()) as server, server.client() as client:

        def ask(_: object) -> httpx.Response:
            with httpx.Client(base_url=server.url, timeout=60) as c:
                return c.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"})

        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(ask, None)
            index = services.keys.queued_index()
            job_id = wait_for(lambda: redis_client.zrange(index, 0, 0), 30, "the job")[0].decode()
            services.draining = True
            time.sleep(2.5)  # two looks at least
            assert not answer.done()
            assert client.get(f"/v1/generations/{job_id}").json()["status"] == "queued"
            services.draining = False
            client.post(f"/v1/generations/{job_id}/cancel")
            # Its own answer once the job ends: the cancel, not a timeout.
            assert "canceled" in answer.result(timeout=30).json()["error"]["message"]


def test_a_full_connection_pool_is_told_apart_from_redis_being_away(redis_url: str) -> None:
    # Both are redis-py ConnectionErrors; only the second is "the job store is unreachable".
    async def check() -> None:
        pool = BlockingConnectionPool.from_url(redis_url, max_connections=1, timeout=0.2)
        client = AsyncRedis.from_pool(pool)
        held = await pool.get_connection()
        try:
            with pytest.raises(redis.exceptions.ConnectionError) as full:
                await client.ping()
            assert pool_exhausted(full.value)
        finally:
            await pool.release(held)
            await client.aclose()
        away = AsyncRedis.from_url(f"redis://127.0.0.1:{free_port()}/0")
        with pytest.raises(redis.exceptions.ConnectionError) as gone:
            await away.ping()
        assert not pool_exhausted(gone.value)
        await away.aclose()

    anyio.run(check)


def test_a_stopping_api_ends_its_streams_and_waits_and_exits(
    settings_for: SettingsFactory, tmp_path: Path
) -> None:
    # uvicorn waits for open connections to finish: a stream of a job queued behind many others
    # kept a SIGTERMed API alive for as long as that job took.
    settings = settings_for()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFCASCADE_")}
    env.update(
        SELFCASCADE_REDIS_URL=settings.redis_url or "",
        SELFCASCADE_REDIS_PREFIX=settings.redis_prefix,
        SELFCASCADE_MODELS_FILE=str(settings.models_file),
        SELFCASCADE_DATA_DIR=str(settings.data_dir),
        PYTHONPATH=str(REPO),
    )
    api = subprocess.Popen(
        [sys.executable, "-m", "service.main", "--port", str(port)], env=env, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            wait_for(lambda: _answers(client), 60, "the API to start")
            job_id = client.post("/v1/generations", json=BODY).json()["id"]

            def stream_to_its_end(_: object) -> list[str]:
                with client.stream("GET", f"/v1/generations/{job_id}/events") as response:
                    return [line for line in response.iter_lines() if line.startswith("event:")]

            def wait_on_a_job(_: object) -> httpx.Response:
                return client.post("/v1/generations", json=BODY, headers={"Prefer": "wait=60"})

            with ThreadPoolExecutor(2) as pool:
                stream = pool.submit(stream_to_its_end, None)
                wait = pool.submit(wait_on_a_job, None)
                wait_for(lambda: _events_open(client) >= 1, 30, "the stream to open")
                api.send_signal(signal.SIGTERM)
                # uvicorn re-raises the signal it stopped on, once it has finished.
                _, log = api.communicate(timeout=30)
                assert api.returncode == -signal.SIGTERM, log
                assert stream.result(timeout=5) == ["event: queued"]  # ended, job still queued
                assert wait.result(timeout=5).status_code == 202  # its wait ended: poll it
    finally:
        if api.poll() is None:
            api.kill()
            api.wait()


def _answers(client: httpx.Client) -> bool:
    try:
        return client.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False


def _events_open(client: httpx.Client) -> int:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("selfcascade_event_streams_open "):
            return int(float(line.split()[-1]))
    raise AssertionError("no selfcascade_event_streams_open in /metrics")
