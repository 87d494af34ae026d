"""Pending webhook deliveries: a Redis sorted set of JSON entries scored by when they are due.

The worker and the API only add entries (never send HTTP from the GPU loop); the delivery
process (`selfcascade-webhooks`) claims due entries, sends them and re-adds failed ones with a
later score, which is how exponential backoff works without a scheduler or a sleeping thread.
A claimed entry sits in an in-flight set until its attempt ends; if the delivery process dies
first, the claim lapses and the entry becomes due again (at least once; receivers deduplicate
on `webhook-id`).
"""

from __future__ import annotations

import time
import uuid

from pydantic import BaseModel
from redis import Redis

from contract import histograms
from contract.jobs import JobRecord, JobStatus, WebhookEvent
from contract.keys import RedisKeys
from contract.state import decode_record

WEBHOOK_DELIVERIES = "webhook_deliveries_total"


class WebhookDelivery(BaseModel):
    id: str  # the `webhook-id` header: the same across retries, so receivers can deduplicate
    job_id: str
    event: WebhookEvent
    url: str
    attempt: int = 0
    # The job as it was when the event happened: the body shows that moment, not a later one.
    record: JobRecord | None = None
    body: str | None = None  # frozen at the first attempt so every retry sends the same bytes


def webhook_event_for(status: JobStatus) -> WebhookEvent:
    if status is JobStatus.RUNNING:
        return "start"
    return "completed" if status.is_terminal else "progress"


def enqueue_webhook(
    redis: Redis, keys: RedisKeys, record: JobRecord, event: WebhookEvent, due: float | None = None
) -> bool:
    """Queue `event` for the job's webhook if it has one and its filter wants the event."""
    origin = record.origin
    if not origin.webhook or event not in origin.webhook_events_filter:
        return False
    snapshot = decode_record(record.id, redis.hgetall(keys.job(record.id)))  # type: ignore[arg-type]
    delivery = WebhookDelivery(
        id=f"msg_{uuid.uuid4().hex}",
        job_id=record.id,
        event=event,
        url=origin.webhook,
        record=snapshot,
    )
    schedule(redis, keys, delivery, due if due is not None else time.time())
    return True


def schedule(redis: Redis, keys: RedisKeys, delivery: WebhookDelivery, due: float) -> None:
    redis.zadd(keys.webhooks(), {delivery.model_dump_json(): due})


# KEYS: pending, in flight. ARGV: now, limit, claim seconds. Lapsed claims go back first.
_CLAIM = """
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, entry in ipairs(lapsed) do
  redis.call('ZREM', KEYS[2], entry)
  redis.call('ZADD', KEYS[1], ARGV[1], entry)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, entry in ipairs(due) do
  redis.call('ZREM', KEYS[1], entry)
  redis.call('ZADD', KEYS[2], tonumber(ARGV[1]) + tonumber(ARGV[3]), entry)
end
return due
"""


class Claimed(BaseModel):
    raw: bytes  # the entry as stored, to remove from the in-flight set when the attempt ends
    delivery: WebhookDelivery


def claim_due(
    redis: Redis, keys: RedisKeys, now: float, limit: int, claim_s: float
) -> list[Claimed]:
    """Up to `limit` due entries, moved atomically to in-flight for `claim_s` seconds."""
    raw: list[bytes] = redis.eval(  # type: ignore[assignment]
        _CLAIM, 2, keys.webhooks(), keys.webhooks_in_flight(), now, limit, claim_s
    )
    return [Claimed(raw=e, delivery=WebhookDelivery.model_validate_json(e)) for e in raw]


def finish_claim(redis: Redis, keys: RedisKeys, claimed: Claimed) -> None:
    redis.zrem(keys.webhooks_in_flight(), claimed.raw)


def count_outcome(redis: Redis, keys: RedisKeys, outcome: str) -> None:
    redis.hincrby(keys.histogram(WEBHOOK_DELIVERIES), outcome, 1)


def read_outcomes(redis: Redis, keys: RedisKeys) -> dict[str, int]:
    return histograms.read_counts(redis, keys, WEBHOOK_DELIVERIES)
