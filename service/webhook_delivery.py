"""Sending one webhook: the job's GET representation, signed, to a re-checked address.

Signatures follow the Standard Webhooks scheme (also Replicate's): the headers
`webhook-id`, `webhook-timestamp` (unix seconds) and `webhook-signature: v1,<base64>`, where the
signature is HMAC-SHA256 over "<id>.<timestamp>.<body>" keyed with the secret's key
(contract.webhook_queue.signing_key: the decoded bytes of a `whsec_` secret). The trace
headers of the request that created the job (X-Request-ID, traceparent) are sent too.

Every attempt has one hard deadline (webhook_timeout_s) over all of its network I/O. httpx's
timeouts bound each read on its own, so a receiver that drips a byte a second would hold a
sender thread for ever; here every connect, TLS handshake, read and write gets at most the time
left until the deadline, and once it has passed the attempt ends as a timeout.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from ssl import SSLContext
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import httpcore
import httpx
from redis import Redis

from contract.keys import RedisKeys
from contract.settings import Settings
from contract.state import JobStore
from contract.webhook_queue import (
    DeadDelivery,
    WebhookDelivery,
    count_outcome,
    record_dead,
    schedule,
    signing_key,
)
from service.views import generation_view
from service.webhook_targets import (
    WebhookPolicy,
    WebhookTarget,
    WebhookTargetRefused,
    WebhookTargetUnresolved,
)

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0
RETRYABLE = frozenset({408, 425, 429})  # and every 5xx
# Receivers' bodies are never used. Reading a short one to its end lets the connection be
# reused; past this much the rest is left unread and the connection closed.
MAX_RESPONSE_BYTES = 64 * 1024

Outcome = Literal["delivered", "retried", "failed", "refused", "dropped"]
GIVEN_UP: frozenset[Outcome] = frozenset({"failed", "refused", "dropped"})


def sign(key: bytes, message_id: str, timestamp: str, body: str) -> str:
    mac = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def retry_delay(failures: int, backoff_s: float, retry_after_s: float = 0.0) -> float:
    """The wait after `failures` failed attempts: exponential backoff, or longer when the
    receiver's Retry-After asks for it, never over MAX_BACKOFF_S."""
    return min(MAX_BACKOFF_S, max(backoff_s * 2 ** (failures - 1), retry_after_s))


# The monotonic deadline of the attempt running in this thread (each sender thread has its own
# context). httpcore gives its network backend no per-request data, hence a context variable.
_deadline: ContextVar[float] = ContextVar("webhook_deadline", default=math.inf)


def _time_left(timeout: float | None, expired: type[httpcore.TimeoutException]) -> float:
    """What one I/O call may take: its own timeout, cut to the time left before the deadline."""
    left = _deadline.get() - time.monotonic()
    if left <= 0:
        raise expired("the webhook attempt's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every call ends by the deadline. A recv returns whatever bytes have
    arrived, so a dripped answer costs one call per byte, each with less time left. A write
    returns once the kernel has buffered it: webhook bodies (a few KB) fit in one."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _time_left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _time_left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: SSLContext, server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        left = _time_left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, left))

    def get_extra_info(self, info: str) -> object:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._backend = httpcore.SyncBackend()

    def connect_tcp(
        self, host: str, port: int, timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        left = _time_left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(
            self._backend.connect_tcp(host, port, left, local_address, socket_options)
        )


@contextmanager
def _until(deadline: float) -> Iterator[None]:
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)


def webhook_client(timeout_s: float) -> httpx.Client:
    """An httpx client whose requests end by the deadline set with `_until`.

    httpx takes no network backend, so its transport's pool is replaced by one with the
    deadline backend (tests/service/test_webhook_delivery.py drips bytes to prove it holds).
    trust_env is off: a proxy from the environment would get a transport of its own, outside
    the deadline, and would reach the target instead of the address checked at delivery.
    """
    ssl_context = httpx.create_ssl_context()
    transport = httpx.HTTPTransport(verify=ssl_context)
    transport._pool = httpcore.ConnectionPool(
        ssl_context=ssl_context,
        max_connections=None,  # the sender's threads bound them
        # No reuse: requests go to the checked IP, so the pool would key a kept connection by
        # IP alone, and the next delivery to another name on that IP (a CDN, a shared ingress)
        # would ride it without its own TLS handshake: no certificate check for its name.
        max_keepalive_connections=0,
        network_backend=_DeadlineBackend(),
    )
    return httpx.Client(
        transport=transport, timeout=timeout_s, follow_redirects=False, trust_env=False
    )


def _read_capped(response: httpx.Response) -> None:
    received = 0
    for chunk in response.iter_raw():
        received += len(chunk)
        if received >= MAX_RESPONSE_BYTES:
            return


class WebhookSender:
    """Sends deliveries over its own deadline-enforcing client; close() it when done."""

    def __init__(self, settings: Settings, redis: Redis) -> None:
        if settings.webhook_secret is None:
            raise ValueError("webhooks need SELFCASCADE_WEBHOOK_SECRET")
        self.settings = settings
        self.key = signing_key(settings.webhook_secret.get_secret_value())
        self.redis = redis
        self.keys = RedisKeys(settings.redis_prefix)
        self.store = JobStore(redis, self.keys, settings.result_ttl_s)
        self.policy = WebhookPolicy.from_settings(settings)
        self.client = webhook_client(settings.webhook_timeout_s)

    def close(self) -> None:
        self.client.close()

    def deliver(self, delivery: WebhookDelivery, deadline: float | None = None) -> Outcome:
        """Send once, ending by `deadline` (time.monotonic(); default webhook_timeout_s from
        now); re-schedules itself on a retryable failure. Returns the outcome."""
        if deadline is None:
            deadline = time.monotonic() + self.settings.webhook_timeout_s
        record = delivery.record or self.store.get(delivery.job_id)
        if record is None:
            return self._outcome(delivery, "dropped", "the generation expired")
        if delivery.body is None:
            # Frozen now, so retries resend exactly what the first attempt sent.
            view = generation_view(record, self.settings.public_url, None)
            delivery.body = view.model_dump_json()
        try:
            target = self.policy.resolve(delivery.url)
        except WebhookTargetUnresolved as exc:
            return self.retry_or_fail(delivery, str(exc))
        except WebhookTargetRefused as exc:
            return self._outcome(delivery, "refused", str(exc))
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "selfcascade-webhooks/0.1",
            "webhook-id": delivery.id,
            "webhook-timestamp": timestamp,
            "webhook-signature": sign(self.key, delivery.id, timestamp, delivery.body),
            "X-Selfcascade-Event": delivery.event,
            "X-Request-ID": record.origin.request_id or "",
            "traceparent": record.origin.traceparent or "",
        }
        try:
            with _until(deadline):
                response = self._post(target, headers, delivery.body)
        except httpx.TransportError as exc:  # timeouts, refused connections, TLS errors
            return self.retry_or_fail(delivery, f"{type(exc).__name__}: {exc}")
        if 200 <= response.status_code < 300:
            return self._outcome(delivery, "delivered", str(response.status_code))
        if response.status_code in RETRYABLE or response.status_code >= 500:
            asked = response.headers.get("Retry-After", "")
            # Seconds in ASCII digits only ("²" is a digit to isdigit(), not to float()).
            wait_s = float(asked) if asked.isascii() and asked.isdigit() else 0.0
            return self.retry_or_fail(delivery, f"HTTP {response.status_code}", wait_s)
        return self._outcome(delivery, "failed", f"HTTP {response.status_code} (not retried)")

    def _post(self, target: WebhookTarget, headers: dict[str, str], body: str) -> httpx.Response:
        """POST to the checked IP with the original Host (and TLS name), never re-resolving.
        The response comes back closed, its body read at most MAX_RESPONSE_BYTES far."""
        parts = urlsplit(target.url)
        ip = f"[{target.address}]" if ":" in target.address else target.address
        pinned = urlunsplit((parts.scheme, f"{ip}:{target.port}", parts.path, parts.query, ""))
        default_port = 443 if target.scheme == "https" else 80
        name = f"[{target.host}]" if ":" in target.host else target.host  # an IPv6 literal
        host = name if target.port == default_port else f"{name}:{target.port}"
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        with self.client.stream(
            "POST", pinned, content=body.encode(), headers={**headers, "Host": host},
            extensions=extensions,
        ) as response:
            _read_capped(response)
        return response

    def retry_or_fail(
        self, delivery: WebhookDelivery, reason: str, retry_after_s: float = 0.0
    ) -> Outcome:
        """Count this attempt as failed: re-schedule the delivery, or give it up when it was
        the last one (a dead letter)."""
        failures = delivery.attempt + 1
        if failures >= self.settings.webhook_max_attempts:
            return self._outcome(delivery, "failed", f"{reason}; no attempts left")
        delay = retry_delay(failures, self.settings.webhook_backoff_s, retry_after_s)
        # A copy is re-queued: `delivery` stays the attempt that ran, for the outcome's report.
        retry = delivery.model_copy(update={"attempt": failures})
        schedule(self.redis, self.keys, retry, time.time() + delay)
        return self._outcome(delivery, "retried", f"{reason}; retry in {delay:.1f}s")

    def _outcome(self, delivery: WebhookDelivery, outcome: Outcome, detail: str) -> Outcome:
        count_outcome(self.redis, self.keys, outcome)
        if outcome in GIVEN_UP:
            # The log line scrolls away; the dead letter lets an operator see what was lost.
            record_dead(self.redis, self.keys, DeadDelivery(
                id=delivery.id, job_id=delivery.job_id, event=delivery.event, url=delivery.url,
                attempts=delivery.attempt + 1, outcome=outcome, error=detail, at=time.time(),
            ))
        level = logging.WARNING if outcome in GIVEN_UP else logging.INFO
        log.log(
            level,
            "webhook %s %s for generation %s (attempt %d): %s",
            delivery.event, outcome, delivery.job_id, delivery.attempt + 1, detail,
            extra={"job_id": delivery.job_id},
        )
        return outcome
