"""Failures inside a job end it cleanly and the worker keeps serving: the real GenerationWorker
runs in this process (burst mode) with the tiny model resident."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from redis import Redis

from contract.jobs import ErrorCode, GenerationParams, JobStatus
from contract.keys import RedisKeys
from contract.queueing import enqueue_generation, generation_queue
from contract.settings import Settings, load_model_specs
from contract.state import JobStore
from contract.storage import build_storage
from tests.service.conftest import SettingsFactory
from worker import resident
from worker.process import GenerationWorker
from worker.resident import ResidentModel, WorkerRuntime

pytestmark = pytest.mark.integration


class OutOfMemoryOnceEngine:
    """The real engine, except that its first generation fails like an exhausted GPU."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.failed = False

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            self.failed = True
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.engine.generate(*args, **kwargs)


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


def test_out_of_memory_fails_the_job_and_the_worker_keeps_serving(runtime_for: Any) -> None:
    rt: WorkerRuntime = runtime_for()
    tiny = rt.models["tiny"]
    rt.models["tiny"] = ResidentModel(tiny.spec, OutOfMemoryOnceEngine(tiny.engine))
    doomed, fine = submit(rt), submit(rt)
    work_burst(rt)

    failed = rt.store.get(doomed)
    assert failed is not None and failed.status is JobStatus.FAILED
    assert failed.error is not None and failed.error.code is ErrorCode.OUT_OF_MEMORY
    served = rt.store.get(fine)
    assert served is not None and served.status is JobStatus.SUCCEEDED
    assert served.outputs[0].sha256


def test_job_timeout_fails_with_code_timeout(runtime_for: Any) -> None:
    rt: WorkerRuntime = runtime_for(job_timeout_s=1)
    slow = submit(rt, steps=150, method="direct")
    work_burst(rt)
    record = rt.store.get(slow)
    assert record is not None and record.status is JobStatus.FAILED
    assert record.error is not None and record.error.code is ErrorCode.TIMEOUT


def test_engine_rejection_fails_with_invalid_request(runtime_for: Any) -> None:
    rt: WorkerRuntime = runtime_for()
    # 64 px at 0.1 strength with 3 steps leaves no step for the re-noise stage.
    rejected = submit(rt, width=128, height=128, steps=3, pivot_strength=0.1)
    work_burst(rt)
    record = rt.store.get(rejected)
    assert record is not None and record.status is JobStatus.FAILED
    assert record.error is not None and record.error.code is ErrorCode.INVALID_REQUEST
    assert "pivot_strength" in record.error.message


def test_cancel_requested_before_start_never_runs(runtime_for: Any) -> None:
    rt: WorkerRuntime = runtime_for()
    job_id = submit(rt)
    rt.store.request_cancel(job_id)
    work_burst(rt)
    record = rt.store.get(job_id)
    assert record is not None and record.status is JobStatus.CANCELED and record.attempts == 0
