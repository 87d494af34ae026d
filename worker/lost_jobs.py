"""Jobs a dequeue lost: `queued` in their record, yet in no queue and under no lease.

A worker takes a job off its queue (RQ pops from several queues at once) and only then
registers it as started. If the reply to that pop is lost, or the worker dies between the two
steps, the job is nowhere RQ looks: no queue holds it, no lease lapses for the reaper, and its
record says `queued` for ever. The queued-jobs index (RedisKeys.queued_index) holds exactly the
jobs in `queued` (every status change keeps it so, contract.state); the reaper goes through it
and pushes a lost one back onto the queue RQ enqueued it on, once it was missing on two passes
in a row (a worker between its pop and its registration is missing only for an instant), at
most once a minute per job (two reapers whose passes overlap push it once).
"""

from __future__ import annotations

import logging
import time

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from contract.queueing import enqueue_generation, generation_queue
from contract.settings import Settings
from contract.state import JobStore, as_text

log = logging.getLogger(__name__)

LOST_AFTER_S = 30.0  # younger jobs are left alone: their pops may be under way
PASS_INTERVAL_S = 15.0  # between two passes (the reaper's own interval is shorter)
REPUSH_GUARD_S = 60


def recover_lost_jobs(
    redis: Redis,
    settings: Settings,
    store: JobStore,
    suspects: set[str],
    older_than_s: float = LOST_AFTER_S,
) -> set[str]:
    """One pass: push back the jobs in `suspects` still missing; returns those missing now for
    the first time (the next pass's suspects)."""
    index = store.keys.queued_index()
    members: list[bytes] = redis.zrangebyscore(index, "-inf", time.time() - older_than_s)  # type: ignore[assignment]
    ids = [as_text(member) for member in members]
    if not ids:
        return set()
    with redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hget(store.keys.job(job_id), "status")
            pipe.hget(Job.key_for(job_id), "origin")  # the queue RQ put it on
        replies = pipe.execute()
    held: dict[str, set[str]] = {}  # queue name -> ids it holds or runs, read once a pass
    missing: set[str] = set()
    for job_id, status, origin in zip(ids, replies[::2], replies[1::2], strict=True):
        if status is None or as_text(status) != "queued":
            redis.zrem(index, job_id)  # expired, or left over from before the index was exact
            continue
        queue = _queue(redis, settings, store, job_id, origin)
        if queue is None:
            continue
        if queue.name not in held:
            held[queue.name] = _held_by(queue)
        if job_id in held[queue.name]:
            continue
        if job_id not in suspects:
            missing.add(job_id)
        elif redis.set(f"{index}:repushed:{job_id}", "1", nx=True, ex=REPUSH_GUARD_S):
            log.warning("generation %s was lost by a dequeue; back on %s", job_id, queue.name)
            if origin is not None:
                queue.push_job_id(job_id, at_front=True)  # it has waited its turn already
            else:
                enqueue_generation(queue, job_id, settings)
    return missing


def _queue(
    redis: Redis, settings: Settings, store: JobStore, job_id: str, origin: bytes | str | None
) -> Queue | None:
    """The queue RQ enqueued the job on (a legacy shared queue too), else its model's."""
    if origin is not None:
        return Queue(as_text(origin), connection=redis, serializer=JSONSerializer)
    record = store.get(job_id)
    if record is None:
        return None
    return generation_queue(redis, settings, record.params.model, record.origin.priority)


def _held_by(queue: Queue) -> set[str]:
    waiting = set(queue.get_job_ids())
    # Without cleanup(): the reaper's own handlers decide about lapsed leases.
    running = set(StartedJobRegistry(queue=queue).get_job_ids(cleanup=False))
    return waiting | running
