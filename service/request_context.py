"""X-Request-ID and W3C traceparent: accepted (or made up) per request, echoed, and put where
routes (into the job's origin) and log records (contract.log_format.TraceFilter) find them."""

from __future__ import annotations

import logging
import time

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contract.trace_context import (
    accept_request_id,
    accept_traceparent,
    request_id_var,
    traceparent_var,
)

log = logging.getLogger("selfcascade.access")


class RequestContext:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer SSE streams)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        request_id = accept_request_id(headers.get(b"x-request-id", b"").decode("latin-1"))
        traceparent = accept_traceparent(headers.get(b"traceparent", b"").decode("latin-1"))
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["traceparent"] = traceparent

        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        rid_token = request_id_var.set(request_id)
        tp_token = traceparent_var.set(traceparent)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # The access log (uvicorn's own is off): one line per request, with its ids.
            log.info(
                "%s %s %d %.1fms",
                scope["method"], scope["path"], status, (time.perf_counter() - started) * 1000,
            )
            request_id_var.reset(rid_token)
            traceparent_var.reset(tp_token)
