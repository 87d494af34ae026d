"""The RQ side of the contract: one queue per model and priority, JSON-serialised, the job
function by name.

The API enqueues `worker.job.run_generation` by name so it never imports the worker (or torch).
The RQ job carries only our job id; the parameters live in the job hash (contract.state).

A job waits in its model's queue, and a worker listens only to the queues of the models it
holds. So a job waits for a worker that can run it (a rollout that adds a model, or one worker
pool per model) instead of failing on whichever worker dequeued it first. Workers listen
priority-major: RQ dequeues from the first non-empty queue, so batch work only runs when no
interactive request for a held model waits (and worker.process rotates the models within one
priority, so a busy model cannot starve another).
"""

from __future__ import annotations

from collections.abc import Iterable

from redis import Redis
from redis.client import Pipeline
from rq import Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer

from contract.jobs import Priority
from contract.settings import Settings

JOB_FUNCTION = "worker.job.run_generation"
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")


def queue_name(settings: Settings, model: str, priority: Priority = "interactive") -> str:
    """`<prefix>:<queue_name>:model:<model>[:batch]`. The `model` segment keeps every name
    apart from the legacy `<prefix>:<queue_name>[:batch]`, also for a model called "batch"
    (model names cannot hold ':', ModelSpec)."""
    suffix = "" if priority == "interactive" else f":{priority}"
    return f"{_model_queue_prefix(settings)}{model}{suffix}"


def models_with_queues(redis: Redis, settings: Settings) -> set[str]:
    """Every model that has had a queue here: RQ registers a queue's name when it first
    enqueues on it and keeps it after the queue empties (so also models no longer served)."""
    prefix = f"{Queue.redis_queue_namespace_prefix}{_model_queue_prefix(settings)}"
    found = set()
    for key in redis.smembers(Queue.redis_queues_keys):
        text = key.decode() if isinstance(key, bytes) else str(key)
        if text.startswith(prefix):
            found.add(text.removeprefix(prefix).split(":")[0])  # model names hold no ':'
    return found


def _model_queue_prefix(settings: Settings) -> str:
    return f"{settings.redis_prefix}:{settings.queue_name}:model:"


def generation_queue(
    redis: Redis, settings: Settings, model: str, priority: Priority = "interactive"
) -> Queue:
    return _queue(redis, queue_name(settings, model, priority))


def generation_queues(redis: Redis, settings: Settings, models: Iterable[str]) -> list[Queue]:
    """Every queue of `models`, priority-major (each model's interactive queue first): the
    order a worker holding those models listens in."""
    names = list(models)
    return [generation_queue(redis, settings, m, p) for p in PRIORITIES for m in names]


def queues_ahead(redis: Redis, settings: Settings, model: str, priority: Priority) -> list[Queue]:
    """The queues a worker drains before `model`'s `priority` queue: its more urgent ones."""
    urgent = PRIORITIES[: PRIORITIES.index(priority)]
    return [generation_queue(redis, settings, model, p) for p in urgent]


def legacy_queues(redis: Redis, settings: Settings) -> list[Queue]:
    """The shared queues of releases before per-model queues (`<prefix>:<queue_name>[:batch]`).

    Workers still drain them, last, so jobs accepted by an older API during a rollout run
    instead of waiting until their records expire. Remove once no deployment predates this.
    """
    base = f"{settings.redis_prefix}:{settings.queue_name}"
    return [_queue(redis, base if p == "interactive" else f"{base}:{p}") for p in PRIORITIES]


def worker_queues(redis: Redis, settings: Settings, models: Iterable[str]) -> list[Queue]:
    """What a worker holding `models` listens to: their queues, then the legacy ones."""
    return generation_queues(redis, settings, models) + legacy_queues(redis, settings)


def enqueue_generation(
    queue: Queue, job_id: str, settings: Settings, pipeline: Pipeline | None = None
) -> Job:
    """Enqueue the job function for `job_id`; with `pipeline`, only queue the writes on it."""
    return queue.enqueue(
        JOB_FUNCTION,
        job_id,
        job_id=job_id,
        job_timeout=settings.job_timeout_s,
        # RQ retries a run that raised (a Redis outage past the worker's retry windows) or whose
        # worker died mid-job (the reaper fails its lapsed lease); engine errors end the job.
        retry=Retry(max=settings.job_retries) if settings.job_retries > 0 else None,
        result_ttl=600,
        failure_ttl=settings.result_ttl_s,
        pipeline=pipeline,
    )


def _queue(redis: Redis, name: str) -> Queue:
    return Queue(name, connection=redis, serializer=JSONSerializer)
