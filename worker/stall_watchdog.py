"""Noticing a worker wedged inside a job.

RQ's job timeout is a SIGALRM, and Python runs signal handlers only between bytecodes: a job
stuck in one native call (a hung CUDA kernel or collective, a deadlocked driver) never times
out. Meanwhile the lease thread runs on, renewing the job's lease and the worker's presence, so
neither the reaper nor the liveness probe would ever notice. The job shows life at every
denoising step; once it has shown none for `stalled_job_s`, the lease thread stops renewing and
the process exits (worker.process): the orchestrator restarts it, and the lapsed lease lets
another worker's reaper retry the job or fail it `worker_lost`.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class StallWatchdog:
    """How long the running job has been quiet. Written by the job's thread, read by the lease
    thread; each attribute write is atomic, so no lock."""

    def __init__(self, limit_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_s = limit_s  # 0 disables
        self._clock = clock
        self._last_sign: float | None = None  # None while no job runs

    def job_started(self) -> None:
        self._last_sign = self._clock()

    def beat(self) -> None:
        if self._last_sign is not None:
            self._last_sign = self._clock()

    def job_ended(self) -> None:
        self._last_sign = None

    def stalled_for(self) -> float | None:
        """Seconds the running job has been quiet, once past the limit; otherwise None."""
        last = self._last_sign
        if self.limit_s <= 0 or last is None:
            return None
        quiet = self._clock() - last
        return quiet if quiet > self.limit_s else None
