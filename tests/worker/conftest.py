"""Worker tests: the service tests' tiny model and settings, plus an in-process worker runtime."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from redis import Redis

from contract.jobs import GenerationParams
from contract.keys import RedisKeys
from contract.queueing import enqueue_generation, generation_queue
from contract.settings import Settings, load_model_specs
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
        rt.models = resident.load_models(load_model_specs(settings), settings)
        resident.install(rt)
        return rt

    yield build
    resident.RESIDENT.clear()


def submit(rt: WorkerRuntime, **params: Any) -> str:
    job_id = uuid.uuid4().hex
    values: dict[str, Any] = dict(prompt="p", model="tiny", width=64, height=64, seed=1, steps=3)
    rt.store.create(job_id, GenerationParams(**{**values, **params}), time.time())
    enqueue_generation(generation_queue(rt.store.redis, rt.settings), job_id, rt.settings)
    return job_id


def work_burst(rt: WorkerRuntime) -> None:
    queue = generation_queue(rt.store.redis, rt.settings)
    GenerationWorker([queue], runtime=rt, connection=rt.store.redis, name=rt.worker_name).work(
        burst=True, with_scheduler=False
    )
