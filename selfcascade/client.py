"""A small HTTP client for a running selfcascade service.

Only httpx: the client runs on machines without torch. Every failure a user can meet (server
down, a 4xx with the server's message) becomes one `ClientError` with a one-line message.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger(__name__)

DEFAULT_SERVER = "http://127.0.0.1:8000"
SERVER_ENV = "SELFCASCADE_SERVER"
API_KEY_ENV = "SELFCASCADE_API_KEY"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
# The server sends a keepalive comment every 15 s by default; a minute of silence means trouble.
EVENTS_READ_TIMEOUT_S = 60.0
EVENTS_RECONNECTS = 3


class ClientError(Exception):
    """A request that could not be made or that the server refused; `str()` is one line."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


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


class ServiceClient:
    """The generation API: create, read, follow, cancel, download."""

    def __init__(
        self,
        server: str,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # httpx drops Authorization on a redirect to another origin (a presigned S3 URL).
        self._http = httpx.Client(
            base_url=self.server, headers=headers, timeout=timeout_s, transport=transport
        )

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def create(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._json("POST", "/v1/generations", json=dict(body))

    def get(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/generations/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/generations/{job_id}/cancel")

    def events(self, job_id: str) -> Iterator[ServerEvent]:
        """Every event of a job until a terminal one; resumes with Last-Event-ID if cut off."""
        last_id: str | None = None
        reconnects = 0
        timeout = httpx.Timeout(self._http.timeout.connect, read=EVENTS_READ_TIMEOUT_S)
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with self._http.stream(
                    "GET", f"/v1/generations/{job_id}/events", headers=headers, timeout=timeout
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise ClientError(error_message(response), response.status_code)
                    for event in parse_sse(response.iter_lines()):
                        last_id = event.id or last_id
                        yield event
                        if event.is_terminal or event.type == "error":
                            return
            except httpx.TransportError as exc:
                if isinstance(exc, httpx.ConnectError) or reconnects >= EVENTS_RECONNECTS:
                    raise ClientError(f"lost the event stream from {self.server}: {exc}") from exc
                reconnects += 1
                log.info("event stream cut (%s); reconnecting after %s", exc, last_id)
                continue
            # The server closed the stream without a terminal event: ask once more.
            reconnects += 1
            if reconnects > EVENTS_RECONNECTS:
                raise ClientError(f"the event stream of {job_id} ended before the job did")

    def download(self, url: str, destination: Path) -> int:
        """Write an output (file or presigned redirect) to `destination`; returns its bytes."""
        written = 0
        try:
            with self._http.stream("GET", url, follow_redirects=True) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ClientError(error_message(response), response.status_code)
                destination.parent.mkdir(parents=True, exist_ok=True)
                with destination.open("wb") as out:
                    for chunk in response.iter_bytes():
                        written += out.write(chunk)
        except httpx.TransportError as exc:
            raise ClientError(f"download from {url} failed: {exc}") from exc
        return written

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise ClientError(f"cannot reach the server at {self.server}: {exc}") from exc
        except httpx.TransportError as exc:
            raise ClientError(f"request to {self.server}{path} failed: {exc}") from exc
        if response.status_code >= 400:
            raise ClientError(error_message(response), response.status_code)
        try:
            body: dict[str, Any] = response.json()
        except ValueError as exc:
            raise ClientError(f"{self.server}{path} did not answer JSON") from exc
        return body
