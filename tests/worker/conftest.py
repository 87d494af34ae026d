"""Worker tests: the service tests' tiny model and settings, plus an in-process worker runtime."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from redis import Redis

from contract.jobs import GenerationParams, JobOrigin, Priority
from contract.keys import RedisKeys
from contract.queueing import enqueue_generation, generation_queue, worker_queues
from contract.settings import Settings, load_model_specs, select_worker_models
from contract.state import JobStore
from contract.storage import build_storage
from tests.service.conftest import SettingsFactory, settings_for, tiny_model_dir
from worker import resident
from worker.process import GenerationWorker
from worker.resident import WorkerRuntime

__all__ = ["runtime_for", "settings_for", "submit", "tiny_model_dir", "work_burst"]


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
