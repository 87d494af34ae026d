"""`Idempotency-Key`: the same key and body give the same job, even when requests race.

The key is claimed (SET NX) before the job exists, so exactly one of any number of concurrent
duplicates creates it; the others wait briefly for that job's record and return it. Keys are
scoped to the API key, so two callers can never collide on (or probe) each other's keys.
"""

from __future__ import annotations

import hashlib
import json
import time

from contract.jobs import ErrorCode, JobRecord
from service.errors import ApiError
from service.schemas import GenerationCreate
from service.services import ApiServices

IDEMPOTENCY_TTL_S = 24 * 3600
RACE_WAIT_S = 5.0  # how long a duplicate waits for the winner to create its record
# A claim whose job record still does not exist this long after it was made belongs to a
# request that died between claiming and creating (an API restart): a replay may take it over.
# Far above the milliseconds that step takes, so a slow winner is never overtaken.
ORPHANED_AFTER_S = 30.0

# Delete the key only if it still names our job: a refused request frees the key it claimed.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Replace an orphaned claim only if it is still the one we saw (two replays: one wins).
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
return false
"""


class IdempotencyClaim:
    def __init__(
        self, services: ApiServices, bucket: str, key: str, body: GenerationCreate
    ) -> None:
        self.services = services
        self.fingerprint = fingerprint(body)
        scoped = hashlib.sha256(f"{bucket}\n{key}".encode()).hexdigest()
        self.redis_key = services.keys.idempotency(scoped)
        # Never longer than the job record lives (result_ttl_s after the job ends, so at least
        # that long after the claim): a key must not outlive the job it names.
        self.ttl_s = min(IDEMPOTENCY_TTL_S, services.settings.result_ttl_s)
        self.value = ""

    def claim(self, job_id: str) -> JobRecord | None:
        """None if this request owns the key; the earlier job if it is a replay; 409 if reused."""
        redis = self.services.redis
        self.value = f"{job_id}:{self.fingerprint}:{time.time():.3f}"
        deadline = time.monotonic() + RACE_WAIT_S
        while True:
            if redis.set(self.redis_key, self.value, nx=True, ex=self.ttl_s):
                return None
            stored: bytes | None = redis.get(self.redis_key)  # type: ignore[assignment]
            if stored is None:
                continue  # the holder was refused and freed the key: claim it again
            earlier_id, earlier_fp, claimed_at = _parse(stored.decode())
            if earlier_fp != self.fingerprint:
                raise ApiError(
                    409, ErrorCode.CONFLICT,
                    "Idempotency-Key was already used with a different body",
                    "Idempotency-Key",
                )
            record = self.services.store.get(earlier_id)
            if record is not None:
                return record
            if time.time() - claimed_at > ORPHANED_AFTER_S:
                if redis.eval(_TAKE_OVER, 1, self.redis_key, stored, self.value, self.ttl_s):
                    return None
                continue  # another replay took it over first: follow its job
            if time.monotonic() > deadline:
                raise ApiError(
                    409, ErrorCode.CONFLICT,
                    "the request holding this Idempotency-Key has not finished; retry",
                    "Idempotency-Key",
                )
            time.sleep(0.02)

    def release(self) -> None:
        self.services.redis.eval(_RELEASE, 1, self.redis_key, self.value)


def fingerprint(body: GenerationCreate) -> str:
    """What makes two bodies the same request. A body without metadata hashes as it did before
    the field existed (a retry across that upgrade is still a replay, not a 409); metadata
    adds its pairs in key order, so neither their order nor an empty object counts."""
    canonical = body.model_dump_json(exclude={"metadata"})
    if body.metadata:
        canonical += "\n" + json.dumps(body.metadata, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _parse(stored: str) -> tuple[str, str, float]:
    """`job id:body fingerprint:claim time`; claims written before the time was kept count as
    old (they can only be taken over when their job does not exist)."""
    job_id, fingerprint, *rest = stored.split(":")
    return job_id, fingerprint, float(rest[0]) if rest else 0.0
