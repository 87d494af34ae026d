"""The RQ side of the contract: one queue, JSON-serialised, the job function named by string.

The API enqueues `worker.job.run_generation` by name so it never imports the worker (or torch).
The RQ job carries only our job id; the parameters live in the job hash (contract.state).
"""

from __future__ import annotations

from redis import Redis
from rq import Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer

from contract.settings import Settings

JOB_FUNCTION = "worker.job.run_generation"


def generation_queue(redis: Redis, settings: Settings) -> Queue:
    return Queue(
        f"{settings.redis_prefix}:{settings.queue_name}",
        connection=redis,
        serializer=JSONSerializer,
    )


def enqueue_generation(queue: Queue, job_id: str, settings: Settings) -> Job:
    return queue.enqueue(
        JOB_FUNCTION,
        job_id,
        job_id=job_id,
        job_timeout=settings.job_timeout_s,
        # Retries only ever happen for abandoned jobs: the job function catches its own errors.
        retry=Retry(max=settings.job_retries) if settings.job_retries > 0 else None,
        result_ttl=600,
        failure_ttl=settings.result_ttl_s,
    )
