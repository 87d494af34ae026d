"""The real loopback network for client tests, with a fault injected where a live server cannot
be made to fail on demand: a connection reset mid-body, a response lost after the server acted
on its request, a refused connection mid-run, the API's `event: error` (its Redis lost
mid-stream). Everything else reaches the real server."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx

Forward = Callable[[httpx.Request], httpx.Response]
Fault = Callable[[httpx.Request, Forward], httpx.Response]
Matcher = Callable[[httpx.Request], bool]


class FaultyNetwork(httpx.HTTPTransport):
    """Records every request; a request that matches an injected fault gets it (once per
    injection), all others go to the server."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[httpx.Request] = []
        self._faults: list[tuple[Matcher, Fault]] = []

    def inject(self, matches: Matcher, fault: Fault, times: int = 1) -> None:
        self._faults.extend([(matches, fault)] * times)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        for index, (matches, fault) in enumerate(self._faults):
            if matches(request):
                del self._faults[index]
                return fault(request, super().handle_request)
        return super().handle_request(request)

    def sent(self, matches: Matcher) -> list[httpx.Request]:
        return [r for r in self.requests if matches(r)]


def events_stream(request: httpx.Request) -> bool:
    return request.url.path.endswith("/events")


def output_file(request: httpx.Request) -> bool:
    return "/outputs/" in request.url.path


def create_call(request: httpx.Request) -> bool:
    return request.method == "POST" and request.url.path == "/v1/generations"


def refuse(request: httpx.Request, forward: Forward) -> httpx.Response:
    raise httpx.ConnectError("connection refused (injected)", request=request)


def error_event(request: httpx.Request, forward: Forward) -> httpx.Response:
    """What the API sends when its Redis drops during a stream, then it closes."""
    body = b'event: error\ndata: {"code": "redis_unavailable"}\n\n'
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)


def lose_response(lost: list[httpx.Response]) -> Fault:
    """The server answers (and acts), the answer never arrives: kept in `lost` for the test."""

    def fault(request: httpx.Request, forward: Forward) -> httpx.Response:
        response = forward(request)
        response.read()
        lost.append(response)
        raise httpx.ReadTimeout("response lost (injected)", request=request)

    return fault


def cut(at: Callable[[bytes], int | None]) -> Fault:
    """The body is reset once `at(received so far)` names an offset: the bytes before it arrive."""

    def fault(request: httpx.Request, forward: Forward) -> httpx.Response:
        response = forward(request)
        stream = _CutStream(response.stream, at, request)
        return httpx.Response(
            response.status_code, headers=response.headers, stream=stream,
            extensions=response.extensions,
        )

    return fault


def after_first_event(received: bytes) -> int | None:
    data = received.find(b"data:")
    end = received.find(b"\n\n", data) if data >= 0 else -1
    return end + 2 if end >= 0 else None


def halfway(received: bytes) -> int | None:
    return len(received) // 2 or None


class _CutStream(httpx.SyncByteStream):
    def __init__(
        self, inner: httpx.SyncByteStream, at: Callable[[bytes], int | None], request: httpx.Request
    ) -> None:
        self.inner, self.at, self.request = inner, at, request

    def __iter__(self) -> Iterator[bytes]:
        received = b""
        for chunk in self.inner:
            received += chunk
            offset = self.at(received)
            if offset is not None:
                yield received[:offset]
                raise httpx.ReadError("connection reset (injected)", request=self.request)
        yield received

    def close(self) -> None:
        self.inner.close()
