"""Backpressure and fairness before a job is created: a per-key token bucket and a per-key
live-job cap, each one Lua script, so concurrent requests cannot overdraw them; and a per-model
queue depth, read with LLEN before enqueueing, so concurrent requests may overshoot it by the
jobs they add at the same moment (a soft bound on memory, not a quota)."""

from __future__ import annotations

import math

from contract.jobs import ErrorCode
from contract.queueing import PRIORITIES
from service.errors import ApiError
from service.services import ApiServices

# KEYS[1]: bucket hash. ARGV: rate (tokens/s), burst, cost. Returns {allowed, retry_after_ms}.
# Time comes from Redis, so every API replica refills the bucket on the same clock.
_TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or burst)
local at = tonumber(redis.call('HGET', KEYS[1], 'at') or now)
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
local wait_ms = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait_ms = math.ceil((cost - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
return {allowed, wait_ms}
"""

# KEYS[1]: the key's active-job set. ARGV: limit, job-hash key prefix, slots wanted, job ids.
# Drops ids whose job ended (or expired) first, so slots free themselves without bookkeeping.
_ACTIVE_JOBS = """
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local status = redis.call('HGET', ARGV[2] .. id, 'status')
  if (not status) or status == 'succeeded' or status == 'failed' or status == 'canceled' then
    redis.call('SREM', KEYS[1], id)
  end
end
local wanted = tonumber(ARGV[3])
if redis.call('SCARD', KEYS[1]) + wanted > tonumber(ARGV[1]) then return 0 end
for i = 4, #ARGV do redis.call('SADD', KEYS[1], ARGV[i]) end
return 1
"""


class Admission:
    def __init__(self, services: ApiServices) -> None:
        self.services = services
        self._bucket = services.redis.register_script(_TOKEN_BUCKET)
        self._active = services.redis.register_script(_ACTIVE_JOBS)

    def refuse_what_never_fits(self, count: int) -> None:
        """422 for `count` jobs at once that no wait makes room for (a 429's Retry-After would
        have the client retry for ever): more than a queue holds or a key may have active."""
        settings = self.services.settings
        limits = [("a model's queue holds", settings.max_queue_length)]
        if settings.max_active_jobs_per_key > 0:
            limits.append(("this key may have active", settings.max_active_jobs_per_key))
        for what, limit in limits:
            if count > limit:
                raise ApiError(
                    422, ErrorCode.INVALID_REQUEST,
                    f"n: {count} images at once are more than {what} ({limit})", "n",
                )

    def check_queue_depth(self, model: str, adding: int = 1) -> None:
        """429 when `model`'s queues have no room for `adding` more jobs. Per model: a model
        whose workers are gone (or not started yet) fills only its own queue, never others'."""
        s = self.services
        waiting = sum(len(s.queue_for(model, p)) for p in PRIORITIES)
        if waiting + adding > s.settings.max_queue_length:
            raise ApiError(
                429, ErrorCode.QUEUE_FULL, f"the queue for model {model} is full; retry later",
                None, {"Retry-After": "5"},
            )

    def take_rate_tokens(self, bucket: str, cost: int = 1) -> None:
        settings = self.services.settings
        if settings.rate_limit_per_minute <= 0:
            return
        rate = settings.rate_limit_per_minute / 60.0
        burst = max(settings.rate_limit_burst, cost)
        allowed, wait_ms = self._bucket(
            keys=[self.services.keys.rate_bucket(bucket)], args=[rate, burst, cost]
        )
        if not int(allowed):
            retry_after = max(1, math.ceil(int(wait_ms) / 1000))
            raise ApiError(
                429, ErrorCode.RATE_LIMITED,
                f"rate limit of {settings.rate_limit_per_minute:g} requests/minute exceeded",
                None, {"Retry-After": str(retry_after)},
            )

    def reserve_active_slots(self, bucket: str, job_ids: list[str]) -> None:
        limit = self.services.settings.max_active_jobs_per_key
        if limit <= 0:
            return
        keys = self.services.keys
        ok = self._active(
            keys=[keys.active_jobs(bucket)],
            args=[limit, keys.job(""), len(job_ids), *job_ids],
        )
        if not int(ok):
            raise ApiError(
                429, ErrorCode.TOO_MANY_ACTIVE_JOBS,
                f"at most {limit} queued or running generations per API key",
                None, {"Retry-After": "2"},
            )

    def release_active_slots(self, bucket: str, job_ids: list[str]) -> None:
        if job_ids:
            self.services.redis.srem(self.services.keys.active_jobs(bucket), *job_ids)
