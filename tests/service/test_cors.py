"""CORS (SELFCASCADE_CORS_ORIGINS) over real HTTP: a real uvicorn on loopback, a real Redis, the
headers a browser would send. No worker runs: jobs stay queued. The browser itself, enforcing
what these headers say, is tests/e2e/test_cross_origin.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from contract.settings import Settings
from service.app import create_app
from tests.conftest import free_port
from tests.live_stack import REPO, ApiServer
from tests.service.conftest import SettingsFactory

pytestmark = pytest.mark.integration

APP = "https://app.example.com"
OTHER = "https://evil.example.net"
KEY = "alice-secret-token-0123456789"
KEYS = f"alice:{KEY}"
BODY = {"prompt": "a harbour", "width": 64, "height": 64, "steps": 2}


@contextmanager
def api(settings_for: SettingsFactory, **overrides: object) -> Iterator[httpx.Client]:
    app = create_app(settings_for(**overrides))
    with ApiServer(app, free_port()) as server, server.client() as client:
        yield client


def preflight(
    client: httpx.Client, origin: str, method: str, path: str, headers: str
) -> httpx.Response:
    return client.options(path, headers={
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    })


def listed(value: str | None) -> set[str]:
    return {part.strip().lower() for part in (value or "").split(",") if part.strip()}


def test_a_preflight_from_a_listed_origin_allows_what_the_api_takes(
    settings_for: SettingsFactory,
) -> None:
    with api(settings_for, cors_origins=f"{APP},http://localhost:5173", auth_mode="keys",
             api_keys=KEYS) as client:
        sent = "authorization,content-type,idempotency-key,prefer,x-request-id,traceparent"
        answer = preflight(client, APP, "POST", "/v1/generations", sent)
        assert answer.status_code == 200, answer.text
        assert answer.headers["access-control-allow-origin"] == APP
        assert {"get", "head", "post"} <= listed(answer.headers["access-control-allow-methods"])
        assert set(sent.split(",")) <= listed(answer.headers["access-control-allow-headers"])
        assert answer.headers["access-control-max-age"] == "600"
        assert "access-control-allow-credentials" not in answer.headers  # keys are no cookies
        assert "origin" in listed(answer.headers["vary"])  # a cache keeps one answer per origin
        assert answer.headers["x-request-id"]  # preflights are logged like any request

        # Following a job: the event stream's resume header, an output's ranges.
        events = preflight(client, "http://localhost:5173", "GET", "/v1/generations/x/events",
                           "authorization,last-event-id")
        assert events.headers["access-control-allow-origin"] == "http://localhost:5173"
        ranges = preflight(client, APP, "GET", "/v1/generations/x/outputs/0",
                           "authorization,range,if-none-match")
        assert ranges.headers["access-control-allow-origin"] == APP


def test_an_origin_not_listed_gets_no_allow_origin(settings_for: SettingsFactory) -> None:
    with api(settings_for, cors_origins=APP) as client:
        for origin in (OTHER, "http://app.example.com", "https://app.example.com:8443"):
            refused = preflight(client, origin, "POST", "/v1/generations", "content-type")
            assert "access-control-allow-origin" not in refused.headers, origin
            actual = client.post("/v1/generations", json=BODY, headers={"Origin": origin})
            assert actual.status_code == 202  # a browser still withholds it from the page
            assert "access-control-allow-origin" not in actual.headers, origin
        # A method the API does not serve, a header it does not read: refused too (a browser
        # takes only a 2xx preflight as a yes).
        method = preflight(client, APP, "DELETE", "/v1/generations/x", "content-type")
        assert (method.status_code, method.text) == (400, "Disallowed CORS method")
        header = preflight(client, APP, "POST", "/v1/generations", "x-forwarded-for")
        assert (header.status_code, header.text) == (400, "Disallowed CORS headers")


def test_a_post_from_a_listed_origin_exposes_its_location(settings_for: SettingsFactory) -> None:
    with api(settings_for, cors_origins=APP, auth_mode="keys", api_keys=KEYS) as client:
        created = client.post("/v1/generations", json=BODY, headers={
            "Origin": APP, "Authorization": f"Bearer {KEY}",
        })
        assert created.status_code == 202, created.text
        # Absolute: resolved against the page's own address, a relative one would send the
        # request, key and all, to the page's server.
        base = str(client.base_url).rstrip("/")
        assert created.headers["location"] == f"{base}/v1/generations/{created.json()['id']}"
        assert created.headers["access-control-allow-origin"] == APP
        exposed = listed(created.headers["access-control-expose-headers"])
        assert {"location", "retry-after", "x-request-id", "preference-applied"} <= exposed
        assert "access-control-allow-credentials" not in created.headers


def test_errors_carry_the_allow_origin_so_the_page_can_read_them(
    settings_for: SettingsFactory,
) -> None:
    with api(settings_for, cors_origins=APP, auth_mode="keys", api_keys=KEYS,
             max_body_bytes=1024, max_queue_length=1) as client:
        origin = {"Origin": APP}
        key = {**origin, "Authorization": f"Bearer {KEY}"}
        answers = {
            401: client.post("/v1/generations", json=BODY, headers=origin),  # from the auth
            422: client.post("/v1/generations", json={**BODY, "width": "wide"}, headers=key),
            # From the body limit, before anything parses the request.
            413: client.post("/v1/generations", json={**BODY, "prompt": "x" * 2000}, headers=key),
            404: client.get("/v1/generations/0123456789abcdef0123456789abcdef", headers=key),
        }
        assert client.post("/v1/generations", json=BODY, headers=key).status_code == 202
        answers[429] = client.post("/v1/generations", json=BODY, headers=key)  # the queue is full
        for status, answer in answers.items():
            assert answer.status_code == status, answer.text
            assert answer.headers["access-control-allow-origin"] == APP, status
            assert answer.json()["error"]["code"]
        assert answers[429].headers["retry-after"]
        assert "retry-after" in listed(answers[429].headers["access-control-expose-headers"])


@pytest.mark.parametrize("allowed", [APP, "*"])
def test_an_unexpected_error_carries_the_allow_origin_too(
    settings_for: SettingsFactory, allowed: str
) -> None:
    """A route's unexpected error is answered inside the middlewares (service.errors), not by
    Starlette's outermost one: the page reads the error and its X-Request-ID, not "Failed to
    fetch", and the connection stays open for its next request."""
    app = create_app(settings_for(cors_origins=allowed))

    @app.get("/v1/broken")
    def broken() -> None:
        raise RuntimeError("a bug")

    with ApiServer(app, free_port()) as server, server.client() as client:
        answer = client.get("/v1/broken", headers={"Origin": APP})
        assert answer.status_code == 500
        assert answer.headers["access-control-allow-origin"] == allowed
        assert "x-request-id" in listed(answer.headers["access-control-expose-headers"])
        assert answer.headers["x-request-id"]
        assert answer.json()["error"]["code"] == "internal_error"
        other = client.get("/v1/broken", headers={"Origin": OTHER})
        assert other.status_code == 500
        if allowed == APP:
            assert "access-control-allow-origin" not in other.headers


def test_any_origin_with_a_star_and_still_no_credentials(settings_for: SettingsFactory) -> None:
    with api(settings_for, cors_origins="*", auth_mode="keys", api_keys=KEYS) as client:
        answer = preflight(client, OTHER, "POST", "/v1/generations", "authorization,content-type")
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "*"
        # "*" does not stand for Authorization among allowed headers: it is named.
        assert "authorization" in listed(answer.headers["access-control-allow-headers"])
        created = client.post("/v1/generations", json=BODY, headers={
            "Origin": OTHER, "Authorization": f"Bearer {KEY}",
        })
        assert created.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in created.headers


def test_no_cors_headers_at_all_when_no_origin_is_set(settings_for: SettingsFactory) -> None:
    with api(settings_for) as client:
        answer = preflight(client, APP, "POST", "/v1/generations", "content-type")
        assert answer.status_code == 405  # as before CORS existed: no route takes OPTIONS
        created = client.post("/v1/generations", json=BODY, headers={"Origin": APP})
        assert created.status_code == 202
        for response in (answer, created):
            assert not [name for name in response.headers if name.startswith("access-control-")]


def test_a_value_that_is_not_an_origin_stops_the_api_at_start(
    tmp_path: Path, redis_url: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFCASCADE_")}
    env.update(
        SELFCASCADE_REDIS_URL=redis_url,
        SELFCASCADE_DATA_DIR=str(tmp_path / "data"),
        SELFCASCADE_CORS_ORIGINS="https://app.example.com, https://shop.example.com/",
        PYTHONPATH=str(REPO),
    )
    done = subprocess.run(
        [sys.executable, "-m", "service.main", "--port", str(free_port())], env=env,
        cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "invalid settings: SELFCASCADE_CORS_ORIGINS: Value error, 'https://shop.example.com/' "
        "ends in a slash, which an origin never has: write 'https://shop.example.com'"
    ], done.stderr


@pytest.mark.parametrize(("value", "problem"), [
    ("app.example.com", "'app.example.com' has no scheme: an origin is scheme://host[:port], "
                        "e.g. 'https://app.example.com'"),
    ("https://app.example.com/v1", "'https://app.example.com/v1' has a path, which an origin "
                                   "never has: write 'https://app.example.com'"),
    ("https://app.example.com:443", "names its default port, which browsers leave out: write "
                                    "'https://app.example.com'"),
    ("https://App.example.com", "is not lowercase, as browsers send it: write "
                                "'https://app.example.com'"),
    ("https://*.example.com", "is a pattern: list each origin, or give '*' alone for any"),
    ("*,https://app.example.com", "'*' allows every origin: give it alone"),
    ("null", "is the origin of sandboxed and local pages"),
    ("https://user@app.example.com", "has user information"),
    ("https://app.example.com:99999", "is not an origin (scheme://host[:port])"),
    ("http://localhost:05173", "has a port with a leading zero, which browsers never send"),
    # Several origins in one entry: only commas separate them.
    ("http://127.0.0.1:8765 http://localhost:8765", "separate origins with commas"),
    ("http://127.0.0.1:8765;http://localhost:8765", "separate origins with commas"),
    ("https://app.example.com?x=1", "has a query, which an origin never has"),
    ("https://app.example.com#f", "has a fragment, which an origin never has"),
    # A page on this machine is almost always plain http.
    ("127.0.0.1:8765", "has no scheme: an origin is scheme://host[:port], e.g. "
     "'http://127.0.0.1:8765'"),
])
def test_each_kind_of_bad_entry_is_named(value: str, problem: str) -> None:
    with pytest.raises(ValidationError, match="cors_origins") as refused:
        Settings(cors_origins=value)  # type: ignore[arg-type]  # as the environment gives it
    assert problem in str(refused.value)


def test_origins_are_read_as_a_comma_separated_list() -> None:
    # An IPv6 literal, a compose service name with `_`, an IDN host in punycode.
    value = (" https://app.example.com , http://localhost:5173,, http://[::1]:8080 ,"
             "http://web_ui:3000,https://xn--bcher-kva.example")
    assert Settings(cors_origins=value).cors_origins == [  # type: ignore[arg-type]
        "https://app.example.com", "http://localhost:5173", "http://[::1]:8080",
        "http://web_ui:3000", "https://xn--bcher-kva.example",
    ]
    assert Settings().cors_origins == []
