"""The RQ side of the contract: two priority queues, JSON-serialised, the job function by name.

The API enqueues `worker.job.run_generation` by name so it never imports the worker (or torch).
The RQ job carries only our job id; the parameters live in the job hash (contract.state).
Workers listen on the queues in PRIORITIES order, and RQ always dequeues from the first
non-empty queue, so batch work only runs when no interactive request waits.
"""

from __future__ import annotations

from redis import Redis
from redis.client import Pipeline
from rq import Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer

from contract.jobs import Priority
from contract.settings import Settings

JOB_FUNCTION = "worker.job.run_generation"
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")


def generation_queue(
    redis: Redis, settings: Settings, priority: Priority = "interactive"
) -> Queue:
    # The interactive queue keeps the historical name, so existing deployments drain as before.
    suffix = "" if priority == "interactive" else f":{priority}"
    return Queue(
        f"{settings.redis_prefix}:{settings.queue_name}{suffix}",
        connection=redis,
        serializer=JSONSerializer,
    )


def generation_queues(redis: Redis, settings: Settings) -> list[Queue]:
    """Every priority queue, most urgent first: the order workers listen in."""
    return [generation_queue(redis, settings, p) for p in PRIORITIES]


def enqueue_generation(
    queue: Queue, job_id: str, settings: Settings, pipeline: Pipeline | None = None
) -> Job:
    """Enqueue the job function for `job_id`; with `pipeline`, only queue the writes on it."""
    return queue.enqueue(
        JOB_FUNCTION,
        job_id,
        job_id=job_id,
        job_timeout=settings.job_timeout_s,
        # Retries only ever happen for abandoned jobs: the job function catches its own errors.
        retry=Retry(max=settings.job_retries) if settings.job_retries > 0 else None,
        result_ttl=600,
        failure_ttl=settings.result_ttl_s,
        pipeline=pipeline,
    )
