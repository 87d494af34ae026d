"""A small HTTP client for a running selfcascade service.

Only httpx: the client runs on machines without torch. Every failure a user can meet (server
down, a 4xx with the server's message) becomes one `ClientError` with a one-line message.

Brief outages are ridden out, not reported: creating and reading a job retry 429/503 (honouring
Retry-After) and lost connections, the event stream reconnects and resumes, each with
exponential backoff plus jitter for at most `retry_budget_s` of consecutive failures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx

from selfcascade.folders import replacing

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_SERVER = "http://127.0.0.1:8000"
SERVER_ENV = "SELFCASCADE_SERVER"
API_KEY_ENV = "SELFCASCADE_API_KEY"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
# The server sends a keepalive comment every 15 s by default; a minute of silence means trouble.
EVENTS_READ_TIMEOUT_S = 60.0
# How long one call keeps retrying through consecutive failures before it reports the last one:
# long enough for a Redis failover or an API rollout, short enough that a dead server is named
# within about a minute.
RETRY_BUDGET_S = 60.0
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
# 429: queue_full, rate_limited, too_many_active_jobs; 503: the job store (Redis) is down.
RETRY_STATUSES = frozenset({429, 503})
# Network failures that may pass; the other transport errors (an ftp:// server URL, a proxy
# misconfigured) would fail the same way on every try.
TRANSIENT_ERRORS = (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError)


class ClientError(Exception):
    """A request that could not be made or that the server refused; `str()` is one line."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _TryAgain(Exception):
    """A failure that may pass: a lost connection, a 429/503, a cut event stream."""

    def __init__(
        self, message: str, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class RetryBudget:
    """Waits between the tries of one call: 0.5, 1, 2, 4, 8, 8... s, each jittered down to half
    (so clients cut off together do not return together) and never shorter than the server's
    Retry-After, until the failures since the last success would pass `total_s`."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self._failing_since: float | None = None
        self._failures = 0

    def reset(self) -> None:
        """The call made progress: later failures get the whole budget again."""
        self._failing_since, self._failures = None, 0

    def wait(self, failure: _TryAgain) -> bool:
        """Sleep before the next try (saying why on the log) and return True; False, at once,
        when that would pass the budget."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        backoff = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2**self._failures)
        delay = max(random.uniform(backoff / 2, backoff), failure.retry_after_s or 0.0)
        if now - self._failing_since + delay > self.total_s:
            return False
        self._failures += 1
        # A warning: a command line user waiting on an unreachable server should see why.
        log.warning("%s; retrying in %.1f s", failure, delay)
        time.sleep(delay)
        return True


@dataclass(frozen=True)
class ServerEvent:
    """One server-sent event: `type` is the SSE event name, `data` its JSON payload."""

    type: str
    data: dict[str, Any] = field(default_factory=dict)
    id: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.data.get("status") in TERMINAL_STATUSES


def server_from_env(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    return environ.get(SERVER_ENV) or DEFAULT_SERVER


def api_key_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    environ = os.environ if environ is None else environ
    return environ.get(API_KEY_ENV) or None


def parse_sse(lines: Iterable[str]) -> Iterator[ServerEvent]:
    """Events from the lines of a text/event-stream (WHATWG rules, the subset this API uses)."""
    event_type, event_id = "message", None
    data_lines: list[str] = []
    for line in lines:
        if not line:
            if data_lines:
                yield ServerEvent(event_type, _json_object("\n".join(data_lines)), event_id)
            event_type, data_lines, event_id = "message", [], None
            continue
        if line.startswith(":"):  # keepalive comment
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event_type = value
        elif name == "data":
            data_lines.append(value)
        elif name == "id":
            event_id = value


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {"text": text}
    return value if isinstance(value, dict) else {"value": value}


def error_message(response: httpx.Response) -> str:
    """`422 invalid_request: width: ...` from the API's uniform error body, or the raw reason."""
    try:
        error = response.json()["error"]
        return f"{response.status_code} {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.reason_phrase}".strip()


def same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    """Same scheme, host and port (httpx normalises a default port to None)."""
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def _retry_after_s(response: httpx.Response) -> float | None:
    """Retry-After in seconds; the HTTP-date form (which this API never sends) is ignored."""
    value = response.headers.get("Retry-After", "").strip()
    # ASCII digits only: "²" is a digit to str.isdigit(), not to float().
    return float(value) if value.isascii() and value.isdigit() else None


def _key_still_in_flight(response: httpx.Response) -> bool:
    """A 409 about our own Idempotency-Key: the first try of this create is still running on the
    server (the client timed out first). The key and body are ours and unchanged, so asking
    again soon returns that try's job."""
    try:
        return response.status_code == 409 and response.json()["error"]["param"] == (
            "Idempotency-Key"
        )
    except (ValueError, KeyError, TypeError):
        return False


def _transport_failure(message: str, exc: httpx.TransportError) -> Exception:
    """`message` as a _TryAgain when `exc` may pass, else as a ClientError."""
    return _TryAgain(message) if isinstance(exc, TRANSIENT_ERRORS) else ClientError(message)


def _raise_for_status(response: httpx.Response) -> None:
    """_TryAgain for a refusal that passes (429, 503, a create still in flight), ClientError for
    any other >= 400."""
    if response.status_code < 400:
        return
    response.read()  # a streamed response's error body
    if response.status_code in RETRY_STATUSES or _key_still_in_flight(response):
        raise _TryAgain(error_message(response), response.status_code, _retry_after_s(response))
    raise ClientError(error_message(response), response.status_code)


class ServiceClient:
    """The generation API: create, read, follow, cancel, download.

    `retry_budget_s` bounds the retries of each call (create, get, events, download): how long
    consecutive failures may last before the last one is raised as a ClientError; 0 never
    retries. Cancel never retries: it follows Ctrl-C, where waiting would be wrong.
    """

    def __init__(
        self,
        server: str,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        retry_budget_s: float = RETRY_BUDGET_S,
    ) -> None:
        self.server = server.rstrip("/")
        self.retry_budget_s = retry_budget_s
        self._api_key = api_key
        # Authorization is set per request, redirects included, by _authorize: never a default
        # header, which would follow the request to any URL an output or a redirect names.
        self._http = httpx.Client(
            base_url=self.server,
            timeout=timeout_s,
            transport=transport,
            event_hooks={"request": [self._authorize]},
        )

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def create(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Submit a generation. Its retries (429, 503, a lost connection or response) carry one
        Idempotency-Key, so the server answers a retry of a request it already took with that
        request's job: one call makes at most one job."""
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        return self._json("POST", "/v1/generations", json=dict(body), headers=headers)

    def get(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/generations/{job_id}")

    def models(self) -> list[dict[str, Any]]:
        """The configured models (GET /v1/models). Needs the key's `read` scope, as reading a
        job does: a 403 here says before any job exists that this key could not follow one."""
        data: list[dict[str, Any]] = self._json("GET", "/v1/models")["data"]
        return data

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/generations/{job_id}/cancel", retry=False)

    def events(self, job_id: str) -> Iterator[ServerEvent]:
        """Every event of a job until a terminal one.

        A cut stream, a refused connection, a 429/503 or the server's `event: error` (its Redis
        is unreachable) reconnect after a backoff and resume after the last event seen
        (Last-Event-ID). Each event of the job and each keepalive renews the budget: a load
        balancer that cuts long streams never ends the wait of a long (or long-queued) job.
        """
        budget = RetryBudget(self.retry_budget_s)
        last_id: str | None = None
        while True:
            try:
                for event in self._event_stream(job_id, last_id, budget):
                    budget.reset()
                    last_id = event.id or last_id
                    yield event
                    if event.is_terminal:
                        return
                raise _TryAgain("the stream ended before the job did")
            except _TryAgain as exc:
                if not budget.wait(exc):
                    raise ClientError(
                        f"lost the event stream of {job_id} from {self.server} ({exc}); the job "
                        f"goes on: see `selfcascade client status {job_id}`",
                        exc.status,
                    ) from exc

    def download(
        self,
        url: str,
        destination: Path,
        *,
        size: int | None = None,
        sha256: str | None = None,
    ) -> int:
        """Write an output (file or presigned redirect) to `destination`; returns its bytes.

        A relative `url` is resolved against the server. The bytes go to a temporary file beside
        `destination`, are checked against `size` and `sha256` (the output's `bytes` and
        `sha256`) when given, and only then replace it: a cut or corrupt download never leaves a
        truncated file nor overwrites a good one.
        """
        target = self._http.base_url.join(url)
        destination.parent.mkdir(parents=True, exist_ok=True)
        return self._retrying(
            lambda: self._download_once(target, destination, size, sha256),
            RetryBudget(self.retry_budget_s),
        )

    def _authorize(self, request: httpx.Request) -> None:
        """The API key goes only to the configured server's own origin: never to a presigned
        storage URL, another host, or an http:// link to an https server, whether named by an
        output or reached by a redirect (this hook runs for every hop)."""
        if self._api_key and same_origin(request.url, self._http.base_url):
            request.headers["Authorization"] = f"Bearer {self._api_key}"
        else:
            request.headers.pop("Authorization", None)

    def _retrying(self, attempt: Callable[[], T], budget: RetryBudget) -> T:
        """`attempt()`, tried again after each _TryAgain while the budget lasts."""
        while True:
            try:
                return attempt()
            except _TryAgain as exc:
                if not budget.wait(exc):
                    raise ClientError(str(exc), exc.status) from exc

    def _json(
        self, method: str, path: str, *, retry: bool = True, **kwargs: Any
    ) -> dict[str, Any]:
        budget = RetryBudget(self.retry_budget_s if retry else 0.0)
        return self._retrying(lambda: self._json_once(method, path, **kwargs), budget)

    def _json_once(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise _TryAgain(f"cannot reach the server at {self.server}: {exc}") from exc
        except httpx.TransportError as exc:
            raise _transport_failure(f"request to {self.server}{path} failed: {exc}", exc) from exc
        _raise_for_status(response)
        try:
            body: dict[str, Any] = response.json()
        except ValueError as exc:
            raise ClientError(f"{self.server}{path} did not answer JSON") from exc
        return body

    def _event_stream(
        self, job_id: str, last_id: str | None, budget: RetryBudget
    ) -> Iterator[ServerEvent]:
        """One connection's events; _TryAgain when it fails or the server reports an error."""
        headers = {"Last-Event-ID": last_id} if last_id else {}
        timeout = httpx.Timeout(self._http.timeout.connect, read=EVENTS_READ_TIMEOUT_S)
        path = f"/v1/generations/{job_id}/events"
        try:
            with self._http.stream("GET", path, headers=headers, timeout=timeout) as response:
                _raise_for_status(response)
                for event in parse_sse(_renewing(response.iter_lines(), budget)):
                    if event.type == "error":  # not the job's: the server lost its Redis
                        raise _TryAgain(f"the server reported {event.data.get('code', 'an error')}")
                    yield event
        except httpx.TransportError as exc:
            raise _transport_failure(f"{type(exc).__name__}: {exc}", exc) from exc

    def _download_once(
        self, url: httpx.URL, destination: Path, size: int | None, sha256: str | None
    ) -> int:
        with replacing(destination) as out:  # a cut or a bad checksum leaves no file there
            written, digest = self._stream_into(url, out)
            _check_download(url, written, digest, size, sha256)
        return written

    def _stream_into(self, url: httpx.URL, out: IO[bytes]) -> tuple[int, str]:
        """The bytes at `url` written to `out`: their count and SHA-256."""
        digest = hashlib.sha256()
        written = 0
        try:
            with self._http.stream("GET", url, follow_redirects=True) as response:
                _raise_for_status(response)
                for chunk in response.iter_bytes():
                    written += out.write(chunk)
                    digest.update(chunk)
        except httpx.TransportError as exc:
            raise _transport_failure(f"download from {url} failed: {exc}", exc) from exc
        return written, digest.hexdigest()


def _renewing(lines: Iterator[str], budget: RetryBudget) -> Iterator[str]:
    """`lines`, resetting `budget` at each keepalive: the server sends one when its XREAD on
    Redis returned nothing, so it shows both working while a job is quiet (queued, say)."""
    for line in lines:
        if line.startswith(":"):
            budget.reset()
        yield line


def _check_download(
    url: httpx.URL, written: int, digest: str, size: int | None, sha256: str | None
) -> None:
    if size is not None and written != size:
        raise ClientError(f"download from {url} gave {written} bytes, the output has {size}")
    if sha256 is not None and digest != sha256:
        raise ClientError(f"download from {url} has SHA-256 {digest}, the output has {sha256}")
