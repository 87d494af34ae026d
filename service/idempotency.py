"""`Idempotency-Key`: the same key and body give the same job, even when requests race.

The key is claimed (SET NX) before the job exists, so exactly one of any number of concurrent
duplicates creates it; the others wait briefly for that job's record and return it. Keys are
scoped to the API key, so two callers can never collide on (or probe) each other's keys.
"""

from __future__ import annotations

import hashlib
import time

from contract.jobs import ErrorCode, JobRecord
from service.errors import ApiError
from service.schemas import GenerationCreate
from service.services import ApiServices

IDEMPOTENCY_TTL_S = 24 * 3600
RACE_WAIT_S = 5.0  # how long a duplicate waits for the winner to create its record

# Delete the key only if it still names our job: a refused request frees the key it claimed.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class IdempotencyClaim:
    def __init__(
        self, services: ApiServices, bucket: str, key: str, body: GenerationCreate
    ) -> None:
        self.services = services
        self.fingerprint = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
        scoped = hashlib.sha256(f"{bucket}\n{key}".encode()).hexdigest()
        self.redis_key = services.keys.idempotency(scoped)

    def claim(self, job_id: str) -> JobRecord | None:
        """None if this request owns the key; the earlier job if it is a replay; 409 if reused."""
        redis = self.services.redis
        value = f"{job_id}:{self.fingerprint}"
        if redis.set(self.redis_key, value, nx=True, ex=IDEMPOTENCY_TTL_S):
            return None
        deadline = time.monotonic() + RACE_WAIT_S
        while True:
            stored: bytes | None = redis.get(self.redis_key)  # type: ignore[assignment]
            if stored is None:
                raise ApiError(
                    409, ErrorCode.CONFLICT,
                    "a concurrent request with this Idempotency-Key was refused; retry",
                    "Idempotency-Key",
                )
            earlier_id, earlier_fp = stored.decode().split(":", 1)
            if earlier_fp != self.fingerprint:
                raise ApiError(
                    409, ErrorCode.CONFLICT,
                    "Idempotency-Key was already used with a different body",
                    "Idempotency-Key",
                )
            record = self.services.store.get(earlier_id)
            if record is not None:
                return record
            if time.monotonic() > deadline:
                raise ApiError(
                    409, ErrorCode.CONFLICT,
                    "the request holding this Idempotency-Key has not finished; retry",
                    "Idempotency-Key",
                )
            time.sleep(0.02)

    def release(self, job_id: str) -> None:
        self.services.redis.eval(_RELEASE, 1, self.redis_key, f"{job_id}:{self.fingerprint}")
