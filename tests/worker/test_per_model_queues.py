"""One queue per model: a worker takes only jobs for models it holds, takes turns between them,
and still reaps abandoned jobs of models it does not hold, or that its models file no longer
names."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from contract.jobs import GenerationParams, JobStatus
from contract.queueing import enqueue_generation, legacy_queues
from tests.live_stack import WorkerProcess, write_models_file
from tests.service.conftest import SettingsFactory
from tests.worker.conftest import submit, work_burst
from tests.worker.test_worker_death import PARAMS, expect_worker_lost
from worker.resident import WorkerRuntime

pytestmark = pytest.mark.integration


@pytest.fixture
def two_models(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A models file naming the tiny model twice, as "tiny" and "tiny-b"."""
    return write_models_file(tmp_path / "two-models.json", tiny_model_dir, ("tiny", "tiny-b"))


def status(rt: WorkerRuntime, job_id: str) -> JobStatus:
    record = rt.store.get(job_id)
    assert record is not None
    return record.status


def test_a_job_waits_for_a_worker_that_holds_its_model(runtime_for: Any, two_models: Path) -> None:
    # A rollout that adds tiny-b: the API accepts its jobs before any worker loaded it.
    old = runtime_for(models_file=two_models, worker_models=["tiny"])
    assert list(old.models) == ["tiny"]
    mine, theirs = submit(old, model="tiny"), submit(old, model="tiny-b")
    work_burst(old)
    assert status(old, mine) is JobStatus.SUCCEEDED
    assert status(old, theirs) is JobStatus.QUEUED  # left for a worker with tiny-b, not failed

    new = runtime_for(models_file=two_models, worker_models=["tiny-b"])
    work_burst(new)
    record = new.store.get(theirs)
    assert record is not None and record.status is JobStatus.SUCCEEDED
    assert record.worker == new.worker_name


def test_a_worker_takes_turns_between_its_models_within_a_priority(
    runtime_for: Any, two_models: Path
) -> None:
    rt = runtime_for(models_file=two_models)
    batch = submit(rt, "batch", model="tiny")
    jobs = [submit(rt, model="tiny") for _ in range(3)]
    jobs += [submit(rt, model="tiny-b") for _ in range(3)]
    work_burst(rt)

    records = [rt.store.get(job_id) for job_id in [batch, *jobs]]
    done = [r for r in records if r is not None and r.status is JobStatus.SUCCEEDED]
    assert len(done) == len(records)
    order = sorted(done, key=lambda r: r.started_at or 0.0)
    # tiny's three jobs were queued first, yet tiny-b's run in between; batch work runs last.
    assert [r.params.model for r in order[:6]] == ["tiny", "tiny-b"] * 3
    assert order[-1].id == batch


def test_a_worker_reaps_abandoned_jobs_of_models_it_does_not_hold(
    settings_for: SettingsFactory, redis_client: Redis, two_models: Path, tmp_path: Path
) -> None:
    # tiny-b's only worker dies mid-job; a worker holding only tiny hands the job back (here,
    # with no retries left, fails it) instead of leaving it "running" until tiny-b returns.
    settings = settings_for(models_file=two_models, job_retries=0)
    doomed = WorkerProcess(settings.model_copy(update={"worker_models": ["tiny-b"]}), "b", tmp_path)
    other = WorkerProcess(settings.model_copy(update={"worker_models": ["tiny"]}), "a", tmp_path)
    expect_worker_lost(
        settings, redis_client, doomed, other, PARAMS.model_copy(update={"model": "tiny-b"})
    )


def test_a_worker_reaps_abandoned_jobs_of_a_model_removed_from_its_models_file(
    settings_for: SettingsFactory,
    redis_client: Redis,
    two_models: Path,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    # A rollout removed tiny-b; its last old worker dies mid-job. The new workers' models file
    # no longer names tiny-b, yet one of them hands the job back instead of leaving it running.
    tiny_only = write_models_file(tmp_path / "tiny-only.json", tiny_model_dir, ("tiny",))
    settings = settings_for(models_file=two_models, job_retries=0)
    doomed = WorkerProcess(settings.model_copy(update={"worker_models": ["tiny-b"]}), "b", tmp_path)
    new = WorkerProcess(settings.model_copy(update={"models_file": tiny_only}), "a", tmp_path)
    expect_worker_lost(
        settings, redis_client, doomed, new, PARAMS.model_copy(update={"model": "tiny-b"})
    )


def test_jobs_left_on_the_shared_queues_of_an_older_release_still_run(
    runtime_for: Any, two_models: Path
) -> None:
    rt = runtime_for(models_file=two_models, worker_models=["tiny"])
    legacy, _ = legacy_queues(rt.store.redis, rt.settings)
    ids = {}
    for model in ("tiny", "tiny-b"):
        job_id = ids[model] = uuid.uuid4().hex
        params = GenerationParams(prompt="p", model=model, width=64, height=64, seed=1, steps=2)
        rt.store.create(job_id, params, time.time())
        enqueue_generation(legacy, job_id, rt.settings)
    work_burst(rt)
    assert status(rt, ids["tiny"]) is JobStatus.SUCCEEDED
    # A shared queue cannot route by model: a job this worker cannot run fails, and says why.
    record = rt.store.get(ids["tiny-b"])
    assert record is not None and record.status is JobStatus.FAILED
    assert record.error is not None and record.error.code.value == "model_unavailable"
    assert "not loaded on the worker that took this job" in record.error.message
