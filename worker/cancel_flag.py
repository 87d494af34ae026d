"""A cancel token for the engine: the job's Redis cancel flag, and whether this run still holds
its job, each read at most every so often."""

from __future__ import annotations

import logging
import time

from redis.exceptions import RedisError

from contract.state import Attempt, JobStore

log = logging.getLogger(__name__)


class RedisCancelFlag:
    """`is_set()` for the engine, which calls it between steps. True once the job's cancel flag
    is up, or, given the run's `attempt`, once the job is no longer this run's: a worker cut off
    from Redis past its lease finds, when it reconnects, its job requeued or run by another
    worker, and stops instead of spending the accelerator on a result that would be dropped
    (`superseded` tells the two apart)."""

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        attempt: Attempt | None = None,
        min_interval_s: float = 0.05,
        ownership_interval_s: float = 1.0,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.attempt = attempt
        self.min_interval_s = min_interval_s
        self.ownership_interval_s = ownership_interval_s
        self._checked_at = 0.0
        self._owner_checked_at = time.monotonic()  # it was ours when the run started
        self._set = False
        self.superseded = False

    def is_set(self) -> bool:
        now = time.monotonic()
        if self._set or self.superseded:
            return True
        try:
            if now - self._checked_at >= self.min_interval_s:
                self._checked_at = now
                self._set = self.store.cancel_requested(self.job_id)
            if self.attempt and now - self._owner_checked_at >= self.ownership_interval_s:
                self._owner_checked_at = now
                self.superseded = not self.store.holds(self.job_id, self.attempt)
                if self.superseded:
                    log.warning(
                        "job %s is no longer this run's (requeued, or run by another worker); "
                        "stopping", self.job_id,
                    )
        except RedisError as exc:
            # A Redis blip must not throw away minutes of GPU work: keep the last answer.
            log.warning("job %s: cancel flag unreadable (%s); going on", self.job_id, exc)
        return self._set or self.superseded
