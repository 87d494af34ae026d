"""Jobs a dequeue lost: `queued` in their record, yet in no queue and under no lease.

A worker takes a job off its queue (RQ pops from several queues at once) and only then
registers it as started. If the reply to that pop is lost, or the worker dies between the two
steps, the job is nowhere RQ looks: no queue holds it, no lease lapses for the reaper, and its
record says `queued` for ever. Every job created or requeued is in an index
(RedisKeys.queued_index); the reaper goes through it, drops the jobs that started or ended, and
pushes a lost one back onto its queue once it was missing on two passes in a row (a worker
between its pop and its registration is missing only for an instant).
"""

from __future__ import annotations

import logging
import time

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.registry import StartedJobRegistry

from contract.jobs import JobStatus
from contract.queueing import enqueue_generation, generation_queue
from contract.settings import Settings
from contract.state import JobStore, as_text

log = logging.getLogger(__name__)

LOST_AFTER_S = 30.0  # younger jobs are left alone: their pops may be under way
BATCH = 1000


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
    held: dict[str, set[str]] = {}  # queue key -> ids it holds or has running, read once
    missing: set[str] = set()
    candidates = redis.zrangebyscore(index, "-inf", time.time() - older_than_s, 0, BATCH)
    for job_id in map(as_text, candidates):  # type: ignore[arg-type]
        record = store.get(job_id)
        if record is None or record.status is not JobStatus.QUEUED:
            redis.zrem(index, job_id)  # started, ended or expired: nothing to watch
            continue
        queue = generation_queue(redis, settings, record.params.model, record.origin.priority)
        if queue.key not in held:
            held[queue.key] = _held_by(queue)
        if job_id in held[queue.key]:
            continue
        if job_id not in suspects:
            missing.add(job_id)
            continue
        log.warning("generation %s was lost by a dequeue; it goes back on %s", job_id, queue.name)
        if redis.exists(Job.key_for(job_id)):
            queue.push_job_id(job_id, at_front=True)  # it has waited its turn already
        else:
            enqueue_generation(queue, job_id, settings)
    return missing


def _held_by(queue: Queue) -> set[str]:
    waiting = set(queue.get_job_ids())
    # Without cleanup(): the reaper's own handlers decide about lapsed leases.
    running = set(StartedJobRegistry(queue=queue).get_job_ids(cleanup=False))
    return waiting | running
