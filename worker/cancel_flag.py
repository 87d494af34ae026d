"""A cancel token backed by the job's Redis flag, read at most every few hundredths of a second."""

from __future__ import annotations

import logging
import time

from redis.exceptions import RedisError

from contract.state import JobStore

log = logging.getLogger(__name__)


class RedisCancelFlag:
    """`is_set()` for the engine, which calls it between steps."""

    def __init__(self, store: JobStore, job_id: str, min_interval_s: float = 0.05) -> None:
        self.store = store
        self.job_id = job_id
        self.min_interval_s = min_interval_s
        self._checked_at = 0.0
        self._set = False

    def is_set(self) -> bool:
        now = time.monotonic()
        if not self._set and now - self._checked_at >= self.min_interval_s:
            self._checked_at = now
            try:
                self._set = self.store.cancel_requested(self.job_id)
            except RedisError as exc:
                # A Redis blip must not throw away minutes of GPU work: keep the last answer.
                log.warning("job %s: cancel flag unreadable (%s); going on", self.job_id, exc)
        return self._set
