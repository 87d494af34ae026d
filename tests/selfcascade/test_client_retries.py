"""ServiceClient riding out what a busy or restarting service does, against the real API on
loopback (no worker: these jobs only need to exist): 429 and 503 with Retry-After, a server
that is still starting, a lost response (the Idempotency-Key makes the retry return the same
job), and where the API key may go."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from selfcascade.client import ClientError, ServiceClient, same_origin
from service.app import create_app
from tests.conftest import free_port
from tests.live_stack import ApiServer
from tests.selfcascade.client_network import (
    FaultyNetwork,
    create_call,
    error_event,
    events_stream,
    lose_response,
    refuse,
)
from tests.service.conftest import make_settings
from tests.service.test_redis_outage import OwnRedis

pytestmark = pytest.mark.integration

BODY = {"prompt": "retry", "width": 64, "height": 64, "steps": 2}
Serve = Callable[..., AbstractContextManager[ApiServer]]


@pytest.fixture
def serve(redis_url: str, tmp_path: Path) -> Serve:
    """The API alone on a loopback port (`port` to choose it), settings overridden."""

    @contextmanager
    def start(port: int | None = None, **overrides: object) -> Iterator[ApiServer]:
        overrides.setdefault("redis_url", redis_url)
        url = str(overrides.pop("redis_url"))
        prefix = f"t{uuid.uuid4().hex[:10]}"
        settings = make_settings(url, prefix, tmp_path / "data", tmp_path / "model", **overrides)
        with ApiServer(create_app(settings), port or free_port()) as api:
            yield api

    return start


def keys_sent(network: FaultyNetwork) -> list[str]:
    return [r.headers["Idempotency-Key"] for r in network.sent(create_call)]


def test_create_retries_429_after_retry_after_with_one_idempotency_key(serve: Serve) -> None:
    network = FaultyNetwork()
    with serve(rate_limit_per_minute=60, rate_limit_burst=1) as api:
        with ServiceClient(api.url, transport=network, retry_budget_s=10) as client:
            first = client.create(BODY)
            started = time.monotonic()
            second = client.create(BODY)  # the bucket is empty: 429, Retry-After 1
            assert time.monotonic() - started >= 1.0
        assert first["id"] != second["id"]
        keys = keys_sent(network)
        assert len(keys) == 3 and keys[0] != keys[1] == keys[2]

        # A Retry-After past the budget is not waited for: the server's refusal, at once.
        with ServiceClient(api.url, retry_budget_s=0.5) as impatient:
            started = time.monotonic()
            with pytest.raises(ClientError, match=r"^429 rate_limited: rate limit") as refused:
                impatient.create(BODY)
            assert time.monotonic() - started < 0.5 and refused.value.status == 429


def test_a_create_whose_response_was_lost_returns_the_job_it_made(serve: Serve) -> None:
    network = FaultyNetwork()
    lost: list[httpx.Response] = []
    network.inject(create_call, lose_response(lost))
    with serve() as api, ServiceClient(api.url, transport=network, retry_budget_s=10) as client:
        job = client.create(BODY)
        assert job["id"] == lost[0].json()["id"]  # the retry made no second job
        keys = keys_sent(network)
        assert len(keys) == 2 and keys[0] == keys[1]
        assert client.get(job["id"])["status"] == "queued"


def test_create_waits_for_a_server_that_is_starting(serve: Serve) -> None:
    port = free_port()
    started = threading.Event()

    def start_later() -> None:
        time.sleep(0.7)
        with serve(port=port):
            started.set()
            time.sleep(5)  # serves while the client retries

    thread = threading.Thread(target=start_later)
    thread.start()
    try:
        with ServiceClient(f"http://127.0.0.1:{port}", retry_budget_s=20) as client:
            job = client.create(BODY)  # connection refused until the server is up
        assert started.is_set() and job["status"] == "queued"
    finally:
        thread.join()


def test_redis_down_503_is_retried_until_it_returns_or_the_budget_ends(
    serve: Serve, tmp_path: Path
) -> None:
    own = OwnRedis(free_port(), tmp_path)  # not started yet: every request is 503
    network = FaultyNetwork()
    later = threading.Timer(0.5, own.start)
    try:
        with serve(redis_url=own.url) as api:
            later.start()
            with ServiceClient(api.url, transport=network, retry_budget_s=20) as client:
                job = client.create(BODY)  # 503 (Retry-After 2) until Redis answers
            assert len(network.sent(create_call)) >= 2
            later.join()
            own.stop()

            with ServiceClient(api.url, transport=network, retry_budget_s=3) as client:
                started = time.monotonic()
                with pytest.raises(ClientError, match=r"^503 redis_unavailable") as down:
                    client.get(job["id"])
            assert time.monotonic() - started >= 2.0  # Retry-After honoured once, then out
            assert down.value.status == 503
            assert len(network.sent(lambda r: r.method == "GET")) == 2
    finally:
        later.cancel()
        own.stop()


def test_event_stream_reconnects_after_an_error_event_and_a_refused_connection(
    serve: Serve,
) -> None:
    network = FaultyNetwork()
    network.inject(events_stream, error_event)
    network.inject(events_stream, refuse)
    with serve() as api, ServiceClient(api.url, transport=network, retry_budget_s=10) as client:
        job = client.create(BODY)
        client.cancel(job["id"])  # queued, so canceled at once: a stream that ends
        assert [e.type for e in client.events(job["id"])] == ["queued", "canceled"]
    assert len(network.sent(events_stream)) == 3


def test_event_stream_gives_up_after_its_budget_naming_the_job(serve: Serve) -> None:
    network = FaultyNetwork()
    network.inject(events_stream, refuse, times=100)
    with serve() as api, ServiceClient(api.url, transport=network, retry_budget_s=1) as client:
        job = client.create(BODY)
        started = time.monotonic()
        with pytest.raises(ClientError) as lost:
            list(client.events(job["id"]))
    assert time.monotonic() - started < 1.5
    message = str(lost.value)
    assert f"lost the event stream of {job['id']}" in message and "refused" in message
    assert f"selfcascade client status {job['id']}" in message and "\n" not in message
    assert len(network.sent(events_stream)) >= 2


def echo_app() -> Starlette:
    """/echo answers with the Authorization header it got; /hop?to=URL redirects there."""

    async def echo(request: Request) -> Response:
        return PlainTextResponse(request.headers.get("authorization", "none"))

    async def hop(request: Request) -> Response:
        return RedirectResponse(request.query_params["to"], status_code=307)

    return Starlette(routes=[Route("/echo", echo), Route("/hop", hop)])


def test_api_key_goes_only_to_the_configured_origin(tmp_path: Path) -> None:
    port = free_port()
    here, elsewhere = f"http://127.0.0.1:{port}", f"http://localhost:{port}"  # same server

    def authorization_seen(client: ServiceClient, url: str) -> str:
        path = tmp_path / "echo.txt"
        client.download(url, path)
        return path.read_text()

    with ApiServer(echo_app(), port), ServiceClient(here, api_key="sk-1") as client:
        assert authorization_seen(client, "/echo") == "Bearer sk-1"  # relative: the server
        assert authorization_seen(client, f"{here}/echo") == "Bearer sk-1"
        assert authorization_seen(client, f"{elsewhere}/echo") == "none"  # another host
        assert authorization_seen(client, f"{here}/hop?to={elsewhere}/echo") == "none"


def test_origins_compare_scheme_host_and_port() -> None:
    assert same_origin(httpx.URL("https://api.test/x"), httpx.URL("https://api.test:443/"))
    assert not same_origin(httpx.URL("http://api.test/x"), httpx.URL("https://api.test/x"))
    assert not same_origin(httpx.URL("https://api.test/"), httpx.URL("https://api.test:8443/"))
    assert not same_origin(httpx.URL("https://api.test/"), httpx.URL("https://s3.test/"))


def test_a_retry_after_that_is_not_seconds_is_ignored_not_a_traceback() -> None:
    """A proxy in front of the API may send anything: "²" is a digit to str.isdigit()."""

    async def busy(request: Request) -> Response:
        return Response(status_code=503, headers={"Retry-After": "\xb2"})

    app = Starlette(routes=[Route("/v1/generations", busy, methods=["POST"])])
    port = free_port()
    with (
        ApiServer(app, port),
        ServiceClient(f"http://127.0.0.1:{port}", retry_budget_s=1) as client,
        pytest.raises(ClientError, match=r"^503"),
    ):
        client.create(BODY)
