"""Worker tests: the service tests' tiny model and settings, plus an in-process worker runtime."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from redis import Redis
from rq.executions import Execution
from rq.job import Job
from rq.job import JobStatus as RQJobStatus
from rq.registry import StartedJobRegistry

from contract.jobs import GenerationParams, JobOrigin, JobStatus, Priority
from contract.keys import RedisKeys
from contract.queueing import enqueue_generation, generation_queue, worker_queues
from contract.settings import Settings, load_model_specs, select_worker_models
from contract.state import JobStore
from contract.storage import build_storage
from tests.service.conftest import SettingsFactory, settings_for, tiny_model_dir
from worker import resident
from worker.abandoned import make_exception_handler
from worker.process import GenerationWorker
from worker.resident import WorkerRuntime

__all__ = [
    "reap_after_lapse", "runtime_for", "settings_for", "start_as", "submit", "take_as_rq_does",
    "tiny_model_dir", "work_burst",
]


@pytest.fixture
def runtime_for(settings_for: SettingsFactory, redis_client: Redis) -> Iterator[Any]:
    def build(**overrides: object) -> WorkerRuntime:
        settings: Settings = settings_for(**overrides)
        rt = WorkerRuntime(
            settings=settings,
            store=JobStore(redis_client, RedisKeys(settings.redis_prefix), settings.result_ttl_s),
            storage=build_storage(settings),
            worker_name=f"inproc-{uuid.uuid4().hex[:6]}",
        )
        specs = select_worker_models(load_model_specs(settings), settings)
        rt.models = resident.load_models(specs, settings)
        resident.install(rt)
        return rt

    yield build
    resident.RESIDENT.clear()


def submit(rt: WorkerRuntime, priority: Priority = "interactive", **params: Any) -> str:
    """Create a job as the API does and enqueue it on its model's queue at `priority`."""
    job_id = uuid.uuid4().hex
    values: dict[str, Any] = dict(prompt="p", model="tiny", width=64, height=64, seed=1, steps=3)
    job = GenerationParams(**{**values, **params})
    rt.store.create(job_id, job, time.time(), JobOrigin(priority=priority))
    queue = generation_queue(rt.store.redis, rt.settings, job.model, priority)
    enqueue_generation(queue, job_id, rt.settings)
    return job_id


def work_burst(rt: WorkerRuntime, **worker_options: Any) -> None:
    """Run an in-process worker until its queues are empty."""
    queues = worker_queues(rt.store.redis, rt.settings, rt.models)
    worker = GenerationWorker(
        queues, runtime=rt, connection=rt.store.redis, name=rt.worker_name, **worker_options
    )
    worker.work(burst=True, with_scheduler=False)


def take_as_rq_does(rt: WorkerRuntime, job_id: str, worker: str, lease_s: int) -> Job:
    """Worker `worker` (another process, simulated) pops the job and RQ registers its
    execution under a lease of `lease_s` seconds, as a worker does before running it."""
    redis = rt.store.redis
    queue = generation_queue(redis, rt.settings, "tiny")
    assert redis.lrem(queue.key, 1, job_id) == 1
    job = Job.fetch(job_id, connection=redis, serializer=queue.serializer)
    with redis.pipeline() as pipe:
        job.set_status(RQJobStatus.STARTED, pipeline=pipe)
        execution = Execution.create(job, ttl=lease_s, pipeline=pipe, worker_name=worker)
        StartedJobRegistry(queue=queue).add_execution(execution, pipeline=pipe, ttl=lease_s)
        pipe.execute()
    return job


def start_as(rt: WorkerRuntime, job_id: str, worker: str, lease_s: int = 1) -> Job:
    """`worker` takes the job (take_as_rq_does) and starts it; its presence key says it lives."""
    job = take_as_rq_does(rt, job_id, worker, lease_s)
    fields = {"worker": worker, "attempts": 1}
    assert rt.store.transition(job_id, [JobStatus.QUEUED], JobStatus.RUNNING, None, fields)
    rt.store.redis.set(rt.store.keys.worker(worker), "{}", ex=30)
    return job


def reap_after_lapse(rt: WorkerRuntime, dead_worker: str, lapse_s: float = 1.5) -> None:
    """`dead_worker` dies; once its lease has lapsed, one reaper pass of this release."""
    rt.store.redis.delete(rt.store.keys.worker(dead_worker))
    time.sleep(lapse_s)
    queue = generation_queue(rt.store.redis, rt.settings, "tiny")
    StartedJobRegistry(queue=queue).cleanup(exception_handlers=[make_exception_handler(rt.store)])
