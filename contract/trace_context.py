"""The request id and W3C trace context of the work in progress, for logs on both sides.

The API sets them per request (middleware), the worker per job (from the job's origin);
the logging filter copies them into every record, so one id follows a generation from the
HTTP request through the worker's logs to its webhooks.
"""

from __future__ import annotations

import contextvars
import re
import secrets
import uuid

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
traceparent_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "traceparent", default=None
)
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# version 00: 2-hex version, 32-hex trace id, 16-hex parent id, 2-hex flags (W3C Trace Context).
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def accept_request_id(value: str | None) -> str:
    """The client's X-Request-ID when it is a sane token, else a fresh one."""
    if value and _REQUEST_ID.match(value):
        return value
    return uuid.uuid4().hex


def accept_traceparent(value: str | None) -> str:
    """The client's traceparent when valid; otherwise this request starts a new trace."""
    match = _TRACEPARENT.match((value or "").strip().lower())
    if match and match.group(1) != "ff" and set(match.group(2)) != {"0"} and set(
        match.group(3)
    ) != {"0"}:
        return match.group(0)
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def trace_id(traceparent: str | None) -> str | None:
    match = _TRACEPARENT.match(traceparent or "")
    return match.group(2) if match else None
