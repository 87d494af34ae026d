"""Workers drain interactive work before batch work, and log with the request's ids."""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from typing import Any

import pytest

from contract.jobs import GenerationParams, JobOrigin, Priority
from contract.log_format import JsonFormatter, TraceFilter
from contract.queueing import enqueue_generation, generation_queue, worker_queues
from worker.process import GenerationWorker
from worker.resident import WorkerRuntime

pytestmark = pytest.mark.integration


def submit_with(rt: WorkerRuntime, priority: Priority, request_id: str) -> str:
    job_id = uuid.uuid4().hex
    params = GenerationParams(prompt="p", model="tiny", width=64, height=64, seed=1, steps=2)
    origin = JobOrigin(priority=priority, request_id=request_id)
    rt.store.create(job_id, params, time.time(), origin)
    queue = generation_queue(rt.store.redis, rt.settings, params.model, priority)
    enqueue_generation(queue, job_id, rt.settings)
    return job_id


def test_interactive_jobs_run_before_earlier_batch_jobs(runtime_for: Any) -> None:
    rt: WorkerRuntime = runtime_for()
    batch = [submit_with(rt, "batch", f"b{i}") for i in range(2)]
    interactive = [submit_with(rt, "interactive", f"i{i}") for i in range(2)]

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(TraceFilter())
    handler.setFormatter(JsonFormatter())
    job_log = logging.getLogger("worker.job")
    job_log.addHandler(handler)
    previous_level = job_log.level
    job_log.setLevel(logging.INFO)
    try:
        queues = worker_queues(rt.store.redis, rt.settings, rt.models)
        GenerationWorker(queues, runtime=rt, connection=rt.store.redis, name=rt.worker_name).work(
            burst=True, with_scheduler=False
        )
    finally:
        job_log.removeHandler(handler)
        job_log.setLevel(previous_level)

    started = {}
    for job_id in batch + interactive:
        record = rt.store.get(job_id)
        assert record is not None and record.status.value == "succeeded"
        assert record.started_at is not None
        started[job_id] = record.started_at
    assert max(started[j] for j in interactive) < min(started[j] for j in batch)

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    begun = [line for line in lines if "started" in line["message"]]
    assert [line["request_id"] for line in begun] == ["i0", "i1", "b0", "b1"]
    assert all(line["job_id"] and line["level"] == "info" for line in begun)
