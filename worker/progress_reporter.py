"""Engine progress -> the job hash and event stream, throttled so Redis is not written per step
of a fast model, but always writing the last step of every stage."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from contract.jobs import ProgressRecord
from contract.state import Attempt, JobStore

log = logging.getLogger(__name__)


class ThrottledProgress:
    def __init__(
        self,
        store: JobStore,
        job_id: str,
        attempt: Attempt | None,
        min_interval_s: float,
        on_written: Callable[[ProgressRecord], None] | None = None,
        on_step: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.on_written = on_written
        self.on_step = on_step  # every step, before throttling: the stall watchdog's beat
        self.job_id = job_id
        self.attempt = attempt  # writes are refused once another attempt holds the job
        self.min_interval_s = min_interval_s
        self._written_at = 0.0
        self.last: ProgressRecord | None = None

    def __call__(self, progress: Any) -> None:
        if self.on_step:
            self.on_step()
        record = ProgressRecord(
            stage=progress.stage,
            stages=progress.stages,
            step=progress.step,
            steps=progress.steps,
            fraction=round(float(progress.fraction), 6),
            width=progress.width,
            height=progress.height,
        )
        self.last = record
        now = time.monotonic()
        stage_done = progress.step == progress.steps
        if stage_done or now - self._written_at >= self.min_interval_s:
            self._written_at = now
            try:
                written = self.store.report_progress(self.job_id, record, self.attempt)
            except RedisError as exc:
                # Progress is advisory; the generation goes on and the next write catches up.
                log.warning("job %s: progress not written (%s)", self.job_id, exc)
                return
            if written and self.on_written:
                self.on_written(record)
