"""Pending webhook deliveries: a Redis sorted set of JSON entries scored by when they are due.

The worker and the API only add entries (never send HTTP from the GPU loop); the delivery
process (`selfcascade-webhooks`) claims due entries, sends them and re-adds failed ones with a
later score, which is how exponential backoff works without a scheduler or a sleeping thread.
A claimed entry sits in an in-flight set until its attempt ends; if the delivery process dies
first, the claim lapses and the entry becomes due again (at least once; receivers deduplicate
on `webhook-id`). Deliveries given up on go to a short dead-letter list for operators.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid

from pydantic import BaseModel
from redis import Redis

from contract import histograms
from contract.jobs import JobRecord, WebhookEvent
from contract.keys import RedisKeys
from contract.state import decode_record

WEBHOOK_DELIVERIES = "webhook_deliveries_total"
STANDARD_SECRET_PREFIX = "whsec_"
# A claim outlives its send's deadline by this much. The deadline starts before the claim is
# made, so the claim covers the whole send; the margin is for what a deadline cannot cut short:
# the DNS lookup of the delivery-time address check (the resolver's own retries can block it
# for tens of seconds) and the Redis writes that record the outcome.
CLAIM_MARGIN_S = 60.0
# Newest dead letters kept: enough to see what failed and why, never unbounded memory.
DEAD_LETTERS_KEPT = 1000


class WebhookDelivery(BaseModel):
    id: str  # the `webhook-id` header: the same across retries, so receivers can deduplicate
    job_id: str
    event: WebhookEvent
    url: str
    # Who the per-receiver send limit counts this under (JobOrigin.webhook_receiver). Before
    # `record` on purpose: the claim script reads the first `,"receiver":"` of the entry.
    receiver: str | None = None
    attempt: int = 0
    # The job as it was when the event happened: the body shows that moment, not a later one.
    record: JobRecord | None = None
    body: str | None = None  # frozen at the first attempt so every retry sends the same bytes


def enqueue_webhook(
    redis: Redis, keys: RedisKeys, record: JobRecord, event: WebhookEvent, due: float | None = None
) -> bool:
    """Queue `event` for the job's webhook if it has one and its filter wants the event."""
    if not wants_webhook(record, event):
        return False
    snapshot = decode_record(record.id, redis.hgetall(keys.job(record.id)))  # type: ignore[arg-type]
    delivery = webhook_delivery(record, event, snapshot)
    schedule(redis, keys, delivery, due if due is not None else time.time())
    return True


def wants_webhook(record: JobRecord, event: WebhookEvent) -> bool:
    origin = record.origin
    return bool(origin.webhook) and event in origin.webhook_events_filter


def webhook_delivery(
    record: JobRecord, event: WebhookEvent, snapshot: JobRecord | None
) -> WebhookDelivery:
    """`event` for `record`'s webhook, with `snapshot` (the job as of the event) as its body."""
    return WebhookDelivery(
        id=f"msg_{uuid.uuid4().hex}",
        job_id=record.id,
        event=event,
        url=record.origin.webhook or "",
        receiver=record.origin.webhook_receiver,
        record=snapshot,
    )


def signing_key(secret: str) -> bytes:
    """The HMAC-SHA256 key for a webhook secret.

    A Standard Webhooks secret, `whsec_<base64>`, signs with its decoded bytes, as the
    specification's libraries verify. Any other secret signs with its UTF-8 bytes as they are:
    the same signatures as the Standard Webhooks secret `whsec_` + base64(secret).
    Raises ValueError, naming no secret material, when a `whsec_` secret does not decode.
    """
    if not secret.startswith(STANDARD_SECRET_PREFIX):
        return secret.encode()
    try:
        key = base64.b64decode(secret.removeprefix(STANDARD_SECRET_PREFIX), validate=True)
    except binascii.Error:
        key = b""
    if not key:
        raise ValueError(
            f"a secret that starts with {STANDARD_SECRET_PREFIX} must continue with the base64 of"
            " its key (Standard Webhooks); this one does not decode"
        )
    return key


def schedule(redis: Redis, keys: RedisKeys, delivery: WebhookDelivery, due: float) -> None:
    redis.zadd(keys.webhooks(), {delivery.model_dump_json(): due})


# Sends in flight per receiver unless configured (Settings.webhook_receiver_concurrency).
DEFAULT_RECEIVER_CONCURRENCY = 2
# How many due entries one claim looks through for receivers with a free slot (it stays short).
CLAIM_SCAN_WINDOW = 256
# A due entry passed over because its receiver is at its limit is due again this much later:
# behind every entry due now, so a backlog for one busy receiver cannot fill the scan window
# for good and hide the other receivers' entries behind it. (A busy receiver's backlog is then
# sent in no particular order; webhooks promise none, and each body carries its job's state.)
BUSY_RECEIVER_DEFER_S = 1.0

# KEYS: pending, in flight. ARGV: now, limit, claim seconds, sends per receiver, scan window,
# deferral. Lapsed claims go back first. The receiver is the delivery's `receiver` (the address
# the URL resolved to when the job was accepted) or, for entries without one, the URL's
# authority (host:port). Both are read with a pattern rather than cjson: the entries carry whole
# job records, and `url` and `receiver` come before `record` in WebhookDelivery's JSON, so their
# first matches are the delivery's own (the record's origin spells `webhook_receiver`).
_CLAIM = """
local now = tonumber(ARGV[1])
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, entry in ipairs(lapsed) do
  redis.call('ZREM', KEYS[2], entry)
  redis.call('ZADD', KEYS[1], now, entry)
end
local function receiver(entry)
  local known = string.match(entry, ',"receiver":"(.-)"')
  if known then return known end
  local url = string.match(entry, '"url":"(.-)"') or ''
  return string.lower(string.match(url, '^%a[%w+.-]*://([^/?#]*)') or url)
end
local busy = {}
for _, entry in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local r = receiver(entry)
  busy[r] = (busy[r] or 0) + 1
end
local limit, per_receiver = tonumber(ARGV[2]), tonumber(ARGV[4])
local claimed = {}
for _, entry in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[5])) do
  if #claimed >= limit then break end
  local r = receiver(entry)
  if (busy[r] or 0) < per_receiver then
    busy[r] = (busy[r] or 0) + 1
    redis.call('ZREM', KEYS[1], entry)
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), entry)
    claimed[#claimed + 1] = entry
  else
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[6]), entry)
  end
end
return claimed
"""


class Claimed(BaseModel):
    raw: bytes  # the entry as stored, to remove from the in-flight set when the attempt ends
    delivery: WebhookDelivery


def claim_lifetime_s(send_deadline_s: float) -> float:
    """How long a claim lasts, derived from the send's deadline so it always outlives it: a
    claim that lapsed mid-send would let another sender send the same delivery again."""
    return send_deadline_s + CLAIM_MARGIN_S


def claim_due(
    redis: Redis,
    keys: RedisKeys,
    now: float,
    limit: int,
    claim_s: float,
    per_receiver: int = DEFAULT_RECEIVER_CONCURRENCY,
) -> list[Claimed]:
    """Up to `limit` due entries, moved atomically to in-flight for `claim_s` seconds, taking
    none for a receiver that already has `per_receiver` sends in flight (from any sender
    process): a slow or hostile receiver holds at most that many threads, never all of them."""
    raw: list[bytes] = redis.eval(  # type: ignore[assignment]
        _CLAIM, 2, keys.webhooks(), keys.webhooks_in_flight(),
        now, limit, claim_s, per_receiver, CLAIM_SCAN_WINDOW, BUSY_RECEIVER_DEFER_S,
    )
    return [Claimed(raw=e, delivery=WebhookDelivery.model_validate_json(e)) for e in raw]


def finish_claim(redis: Redis, keys: RedisKeys, claimed: Claimed) -> None:
    redis.zrem(keys.webhooks_in_flight(), claimed.raw)


def count_outcome(redis: Redis, keys: RedisKeys, outcome: str) -> None:
    redis.hincrby(keys.histogram(WEBHOOK_DELIVERIES), outcome, 1)


class DeadDelivery(BaseModel):
    """A delivery given up on, with why; `LRANGE <prefix>:webhooks:dead 0 -1` lists them."""

    id: str
    job_id: str
    event: WebhookEvent
    url: str
    attempts: int
    outcome: str  # failed, refused or dropped
    error: str  # the last attempt's error
    at: float  # unix time it was given up


def dead_letters_key(keys: RedisKeys) -> str:
    # Named after the pending set's key, so it shares its prefix and sits beside it.
    return f"{keys.webhooks()}:dead"


def record_dead(redis: Redis, keys: RedisKeys, dead: DeadDelivery) -> None:
    """Newest first and capped, so a receiver gone for good cannot grow Redis without bound."""
    pipe = redis.pipeline()
    pipe.lpush(dead_letters_key(keys), dead.model_dump_json())
    pipe.ltrim(dead_letters_key(keys), 0, DEAD_LETTERS_KEPT - 1)
    pipe.execute()


def read_dead(redis: Redis, keys: RedisKeys, count: int = DEAD_LETTERS_KEPT) -> list[DeadDelivery]:
    """The newest `count` dead letters, newest first."""
    raw: list[bytes] = redis.lrange(dead_letters_key(keys), 0, count - 1)  # type: ignore[assignment]
    return [DeadDelivery.model_validate_json(entry) for entry in raw]


def read_outcomes(redis: Redis, keys: RedisKeys) -> dict[str, int]:
    return histograms.read_counts(redis, keys, WEBHOOK_DELIVERIES)
