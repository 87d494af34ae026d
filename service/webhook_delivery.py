"""Sending one webhook: the job's GET representation, signed, to a re-checked address.

Signatures follow the Standard Webhooks scheme (also Replicate's): the headers
`webhook-id`, `webhook-timestamp` (unix seconds) and `webhook-signature: v1,<base64>`, where the
signature is HMAC-SHA256 with the server's secret over "<id>.<timestamp>.<body>". The trace
headers of the request that created the job (X-Request-ID, traceparent) are sent too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from urllib.parse import urlsplit, urlunsplit

import httpx
from redis import Redis

from contract.keys import RedisKeys
from contract.settings import Settings
from contract.state import JobStore
from contract.webhook_queue import WebhookDelivery, count_outcome, schedule
from service.views import generation_view
from service.webhook_targets import WebhookPolicy, WebhookTarget, WebhookTargetRefused

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0
RETRYABLE = frozenset({408, 425, 429})  # and every 5xx


def sign(secret: str, message_id: str, timestamp: str, body: str) -> str:
    mac = hmac.new(secret.encode(), f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


class WebhookSender:
    def __init__(self, settings: Settings, redis: Redis, client: httpx.Client) -> None:
        if settings.webhook_secret is None:
            raise ValueError("webhooks need SELFCASCADE_WEBHOOK_SECRET")
        self.settings = settings
        self.secret = settings.webhook_secret.get_secret_value()
        self.redis = redis
        self.keys = RedisKeys(settings.redis_prefix)
        self.store = JobStore(redis, self.keys, settings.result_ttl_s)
        self.policy = WebhookPolicy.from_settings(settings)
        self.client = client

    def deliver(self, delivery: WebhookDelivery) -> str:
        """Send once; re-schedules itself on a retryable failure. Returns the outcome."""
        record = delivery.record or self.store.get(delivery.job_id)
        if record is None:
            return self._outcome(delivery, "dropped", "the generation expired")
        if delivery.body is None:
            # Frozen now, so retries resend exactly what the first attempt sent.
            view = generation_view(record, self.settings.public_url, None)
            delivery.body = view.model_dump_json()
        try:
            target = self.policy.resolve(delivery.url)
        except WebhookTargetRefused as exc:
            return self._outcome(delivery, "refused", str(exc))
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "selfcascade-webhooks/0.1",
            "webhook-id": delivery.id,
            "webhook-timestamp": timestamp,
            "webhook-signature": sign(self.secret, delivery.id, timestamp, delivery.body),
            "X-Selfcascade-Event": delivery.event,
            "X-Request-ID": record.origin.request_id or "",
            "traceparent": record.origin.traceparent or "",
        }
        try:
            response = self._post(target, headers, delivery.body)
        except httpx.TransportError as exc:  # timeouts, refused connections, TLS errors
            return self._retry_or_fail(delivery, f"{type(exc).__name__}: {exc}")
        if 200 <= response.status_code < 300:
            return self._outcome(delivery, "delivered", str(response.status_code))
        if response.status_code in RETRYABLE or response.status_code >= 500:
            asked = response.headers.get("Retry-After", "")
            wait_s = float(asked) if asked.isdigit() else 0.0
            return self._retry_or_fail(delivery, f"HTTP {response.status_code}", wait_s)
        return self._outcome(delivery, "failed", f"HTTP {response.status_code} (not retried)")

    def _post(self, target: WebhookTarget, headers: dict[str, str], body: str) -> httpx.Response:
        """POST to the checked IP with the original Host (and TLS name), never re-resolving."""
        parts = urlsplit(target.url)
        ip = f"[{target.address}]" if ":" in target.address else target.address
        pinned = urlunsplit((parts.scheme, f"{ip}:{target.port}", parts.path, parts.query, ""))
        default_port = 443 if target.scheme == "https" else 80
        host = target.host if target.port == default_port else f"{target.host}:{target.port}"
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        return self.client.post(
            pinned, content=body.encode(), headers={**headers, "Host": host}, extensions=extensions
        )

    def _retry_or_fail(
        self, delivery: WebhookDelivery, reason: str, retry_after_s: float = 0.0
    ) -> str:
        delivery.attempt += 1
        if delivery.attempt >= self.settings.webhook_max_attempts:
            return self._outcome(delivery, "failed", f"{reason}; no attempts left")
        # Exponential backoff, or longer when the receiver's Retry-After asks for it.
        backoff = self.settings.webhook_backoff_s * 2 ** (delivery.attempt - 1)
        delay = min(MAX_BACKOFF_S, max(backoff, retry_after_s))
        schedule(self.redis, self.keys, delivery, time.time() + delay)
        return self._outcome(delivery, "retried", f"{reason}; retry in {delay:.1f}s")

    def _outcome(self, delivery: WebhookDelivery, outcome: str, detail: str) -> str:
        count_outcome(self.redis, self.keys, outcome)
        level = logging.INFO if outcome in ("delivered", "retried") else logging.WARNING
        log.log(
            level,
            "webhook %s %s for generation %s (attempt %d): %s",
            delivery.event, outcome, delivery.job_id, delivery.attempt + 1, detail,
            extra={"job_id": delivery.job_id},
        )
        return outcome
