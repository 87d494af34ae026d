"""Failures inside a job end it cleanly and the worker keeps serving: the real GenerationWorker
runs in this process (burst mode) with the tiny model resident."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from contract.jobs import ErrorCode, JobStatus
from contract.storage.s3 import S3ResultStorage
from tests.conftest import free_port
from tests.worker.conftest import submit, work_burst
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
    # 256 px, 150 steps: far beyond the 1 s timeout on any CPU (64 px could finish in time).
    slow = submit(rt, width=256, height=256, steps=150, method="direct")
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


def test_an_unreachable_result_store_fails_as_storage_unavailable(runtime_for: Any) -> None:
    rt: WorkerRuntime = runtime_for()
    healthy = rt.storage
    # A real S3 client against a closed port: botocore's EndpointConnectionError, which is not
    # an OSError, is what an S3/MinIO outage looks like to the worker.
    rt.storage = S3ResultStorage(
        bucket="results", endpoint_url=f"http://127.0.0.1:{free_port()}",
        access_key_id="x", secret_access_key="y",
    )
    lost = submit(rt)
    work_burst(rt)
    record = rt.store.get(lost)
    assert record is not None and record.status is JobStatus.FAILED
    assert record.error is not None and record.error.code is ErrorCode.STORAGE_UNAVAILABLE
    assert "cannot store" in record.error.message and "bucket results" in record.error.message

    rt.storage = healthy  # the outage ends; the same worker serves the next job
    served = submit(rt)
    work_burst(rt)
    done = rt.store.get(served)
    assert done is not None and done.status is JobStatus.SUCCEEDED
