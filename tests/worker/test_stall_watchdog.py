"""A job quiet for longer than SELFCASCADE_STALLED_JOB_S makes its worker give up its lease and
exit; a slow job that keeps stepping never does."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest

from contract.exit_codes import EXIT_WEDGED
from contract.jobs import JobRecord, JobStatus
from tests.live_stack import REPO
from tests.worker.conftest import submit, work_burst
from worker import job as job_module
from worker.cancel_flag import RedisCancelFlag
from worker.resident import WorkerRuntime
from worker.stall_watchdog import StallWatchdog

pytestmark = pytest.mark.integration


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_watchdog_counts_quiet_time_of_the_running_job_only() -> None:
    clock = FakeClock()
    watchdog = StallWatchdog(10.0, clock)
    clock.now += 60
    assert watchdog.stalled_for() is None  # no job: idle is not stalled
    watchdog.job_started()
    clock.now += 9
    watchdog.beat()
    clock.now += 9
    assert watchdog.stalled_for() is None  # 9 s since the last step
    clock.now += 2
    assert watchdog.stalled_for() == pytest.approx(11.0)
    watchdog.job_ended()
    assert watchdog.stalled_for() is None
    disabled = StallWatchdog(0.0, clock)
    disabled.job_started()
    clock.now += 1e6
    assert disabled.stalled_for() is None


def run_and_watch(rt: WorkerRuntime) -> tuple[JobRecord, list[str]]:
    stalls: list[str] = []
    job_id = submit(rt, steps=8)
    work_burst(rt, on_stall=lambda: stalls.append(job_id))
    record = rt.store.get(job_id)
    assert record is not None and record.status is JobStatus.SUCCEEDED  # on_stall did not exit
    return record, stalls


def test_a_job_stuck_after_its_last_step_trips_the_watchdog(
    runtime_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lease thread looks every second (lease 3 s); the limit is 1 s, the hang 3.5 s.
    rt = runtime_for(stalled_job_s=1.0, worker_lease_s=3)
    store_images = job_module.store_images

    def hung_upload(*args: Any, **kwargs: Any) -> Any:
        time.sleep(3.5)  # stands in for a native call that never returns
        return store_images(*args, **kwargs)

    monkeypatch.setattr(job_module, "store_images", hung_upload)
    record, stalls = run_and_watch(rt)
    assert stalls == [record.id]  # once: the lease thread stops renewing after it


def test_a_slow_job_that_keeps_stepping_is_not_stalled(
    runtime_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Eight steps of about 0.5 s each: 4 s in all, over twice the limit, never 1.5 s quiet
    # (a second of slack: on a loaded machine the start before the first step takes a while).
    rt = runtime_for(stalled_job_s=1.5, worker_lease_s=3)
    is_set = RedisCancelFlag.is_set

    def slow_step(self: RedisCancelFlag) -> bool:
        time.sleep(0.5)
        return is_set(self)

    monkeypatch.setattr(RedisCancelFlag, "is_set", slow_step)
    record, stalls = run_and_watch(rt)
    assert stalls == []
    assert record.finished_at and record.started_at
    assert record.finished_at - record.started_at > 2 * rt.settings.stalled_job_s


def test_the_default_stall_action_exits_for_a_restart() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from worker.process import _exit_for_restart; _exit_for_restart()"],
        cwd=REPO, capture_output=True, timeout=120, check=False,
    )
    assert done.returncode == EXIT_WEDGED
