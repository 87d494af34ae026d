"""A worker SIGKILLed mid-job: its lease lapses, RQ retries the job on another worker, and it
succeeds. A worker sent SIGTERM finishes its job first, then exits."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest
from redis import Redis

from contract.jobs import GenerationParams, JobStatus
from contract.keys import RedisKeys
from contract.queueing import enqueue_generation, generation_queue
from contract.settings import Settings
from contract.state import JobStore
from tests.live_stack import WorkerProcess, wait_for
from tests.service.conftest import SettingsFactory

pytestmark = pytest.mark.integration

# Long enough to be caught mid-run even on an idle machine (192 px: attention over 48x48 latent
# tokens, several seconds for 120 steps), short enough to run twice.
PARAMS = GenerationParams(
    prompt="kill me", model="tiny", width=192, height=192, seed=3, steps=120, method="direct"
)


def all_events(store: JobStore, job_id: str) -> list[str]:
    """Every event type of the job's stream (read_events pages 100 at a time)."""
    types: list[str] = []
    after = "0"
    while page := store.read_events(job_id, after=after):
        types += [event.type for _, event in page]
        after = page[-1][0]
    return types


def submit(
    store: JobStore, settings: Settings, job_id: str, params: GenerationParams = PARAMS
) -> None:
    store.create(job_id, params, time.time())
    enqueue_generation(generation_queue(store.redis, settings, params.model), job_id, settings)


def test_sigkilled_worker_job_is_retried_elsewhere_and_succeeds(
    settings_for: SettingsFactory, redis_client: Redis, tmp_path: Path
) -> None:
    settings: Settings = settings_for()
    store = JobStore(redis_client, RedisKeys(settings.redis_prefix), settings.result_ttl_s)
    workers = {
        name: WorkerProcess(settings, name, tmp_path).start() for name in ("victim-a", "victim-b")
    }
    try:
        for worker in workers.values():
            worker.wait_ready(redis_client)
        job_id = "a" * 32
        submit(store, settings, job_id)

        def running_with_progress() -> str | None:
            record = store.get(job_id)
            assert record is not None
            return record.worker if record.status is JobStatus.RUNNING and record.progress else None

        first = wait_for(running_with_progress, 120, "the job to run")
        workers[first].kill()

        def finished() -> bool:
            record = store.get(job_id)
            return record is not None and record.status.is_terminal

        wait_for(finished, 180, "the retried job to finish", interval_s=0.1)
        record = store.get(job_id)
        assert record is not None
        assert record.status is JobStatus.SUCCEEDED, record.error
        assert record.attempts == 2
        assert record.worker != first
        events = all_events(store, job_id)
        assert events.count("started") == 2 and "requeued" in events
        assert events[-1] == "succeeded"
    finally:
        for worker in workers.values():
            worker.stop()


def test_sigterm_finishes_the_current_job_then_exits(
    settings_for: SettingsFactory, redis_client: Redis, tmp_path: Path
) -> None:
    settings: Settings = settings_for()
    store = JobStore(redis_client, RedisKeys(settings.redis_prefix), settings.result_ttl_s)
    worker = WorkerProcess(settings, "graceful", tmp_path).start()
    try:
        worker.wait_ready(redis_client)
        job_id = "b" * 32
        submit(store, settings, job_id)
        wait_for(
            lambda: (r := store.get(job_id)) is not None and r.progress is not None,
            120, "the job to make progress",
        )
        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(timeout=180) == 0
        record = store.get(job_id)
        assert record is not None and record.status is JobStatus.SUCCEEDED
        assert not redis_client.exists(RedisKeys(settings.redis_prefix).worker("graceful"))
    finally:
        worker.stop()


def test_dead_worker_without_retries_left_fails_the_job_instead_of_leaving_it_running(
    settings_for: SettingsFactory, redis_client: Redis, tmp_path: Path
) -> None:
    settings: Settings = settings_for(job_retries=0)
    doomed = WorkerProcess(settings, "only-worker", tmp_path)
    # The next worker to come up reaps the abandoned job.
    successor = WorkerProcess(settings, "successor", tmp_path)
    expect_worker_lost(settings, redis_client, doomed, successor, PARAMS)


def expect_worker_lost(
    settings: Settings,
    redis: Redis,
    doomed: WorkerProcess,
    successor: WorkerProcess,
    params: GenerationParams,
) -> None:
    """Submit a long job, SIGKILL `doomed` once it makes progress, then start `successor`: with
    no retries left (job_retries=0), its reaper must fail the job `worker_lost`."""
    store = JobStore(redis, RedisKeys(settings.redis_prefix), settings.result_ttl_s)
    job_id = uuid.uuid4().hex
    try:
        doomed.start().wait_ready(redis)
        submit(store, settings, job_id, params)
        wait_for(
            lambda: (r := store.get(job_id)) is not None and r.progress is not None,
            120, "the job to make progress",
        )
        doomed.kill()
        successor.start().wait_ready(redis)
        wait_for(
            lambda: (r := store.get(job_id)) is not None and r.status.is_terminal,
            60, "the abandoned job to be failed",
        )
        record = store.get(job_id)
        assert record is not None and record.status is JobStatus.FAILED
        assert record.error is not None and record.error.code.value == "worker_lost"
    finally:
        doomed.stop()
        successor.stop()
