"""Jobs a dequeue lost: `queued` in their record, yet in no queue and under no lease.

A worker takes a job off its queue (RQ pops from several queues at once) and only then
registers it as started. If the reply to that pop is lost, or the worker dies between the two
steps, the job is nowhere RQ looks: no queue holds it, no lease lapses for the reaper, and its
record says `queued` for ever. The queued-jobs index (RedisKeys.queued_index) holds exactly the
jobs in `queued` (every status change keeps it so, contract.state); the reaper goes through it
and pushes a lost one back onto the queue RQ enqueued it on, once it was missing on two passes
in a row (a worker between its pop and its registration is missing only for an instant), at
most once a minute per job (two reapers whose passes overlap push it once).

A job lost again and again is lost for a reason that will not go away by itself (every worker
that takes it fails before starting it: a record this release cannot read, say), so after
MAX_TIMES_LOST returns it is failed `worker_lost`, not pushed back for ever.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from contract.endings import end_queued
from contract.jobs import ErrorCode, ErrorInfo, JobStatus
from contract.queueing import enqueue_generation, generation_queue
from contract.settings import Settings
from contract.state import JobStore, UnreadableRecord, as_text

log = logging.getLogger(__name__)

LOST_AFTER_S = 30.0  # younger jobs are left alone: their pops may be under way
PASS_INTERVAL_S = 15.0  # between two passes (the reaper's own interval is shorter)
REPUSH_GUARD_S = 60
MAX_TIMES_LOST = 3
TIMES_LOST_FIELD = "times_lost"

# Both act only on a job still `queued` at that instant (a read a moment earlier may be stale:
# a job requeued meanwhile is back in the index and must stay there). KEYS: job hash, index.
_FORGET_UNLESS_QUEUED = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then redis.call('ZREM', KEYS[2], ARGV[1]) end
"""
_COUNT_A_LOSS = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return -1 end
return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
"""


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
    one_pass = _Pass(redis, settings, store, suspects)
    missing: set[str] = set()
    for job_id, status, origin in zip(ids, replies[::2], replies[1::2], strict=True):
        try:
            if one_pass.is_missing(job_id, status, origin):
                missing.add(job_id)
        except Exception:
            # One job's trouble must not stop the pass for every other lost job.
            log.exception("lost-jobs pass: generation %s skipped", job_id)
    return missing


@dataclass
class _Pass:
    """One pass over the queued-jobs index: what it needs, and what it reads only once."""

    redis: Redis
    settings: Settings
    store: JobStore
    suspects: set[str]  # missing on the previous pass
    held: dict[str, set[str]] = field(default_factory=dict)  # queue name -> ids it holds or runs

    def is_missing(self, job_id: str, status: bytes | None, origin: bytes | None) -> bool:
        """Whether the job is missing for the first time; a suspect missing again is dealt
        with."""
        index = self.store.keys.queued_index()
        if status is None or as_text(status) != "queued":
            # Expired, or left over from before the index was exact.
            self.redis.eval(_FORGET_UNLESS_QUEUED, 2, self.store.keys.job(job_id), index, job_id)
            return False
        queue = self._queue(job_id, origin)
        if queue is not None and job_id in self._held_by(queue):
            return False
        if job_id not in self.suspects:
            return True
        if self.redis.set(f"{index}:repushed:{job_id}", "1", nx=True, ex=REPUSH_GUARD_S):
            self._push_back_or_give_up(job_id, queue, known=origin is not None)
        return False

    def _queue(self, job_id: str, origin: bytes | None) -> Queue | None:
        """The queue RQ enqueued the job on (a legacy shared queue too), else its model's; None
        when neither can be told (RQ's entry is gone and the record cannot be decoded)."""
        if origin is not None:
            return Queue(as_text(origin), connection=self.redis, serializer=JSONSerializer)
        try:
            record = self.store.get(job_id)
        except UnreadableRecord:
            return None
        if record is None:
            return None
        return generation_queue(
            self.redis, self.settings, record.params.model, record.origin.priority
        )

    def _held_by(self, queue: Queue) -> set[str]:
        if queue.name not in self.held:
            waiting = set(queue.get_job_ids())
            # Without cleanup(): the reaper's own handlers decide about lapsed leases.
            running = set(StartedJobRegistry(queue=queue).get_job_ids(cleanup=False))
            self.held[queue.name] = waiting | running
        return self.held[queue.name]

    def _push_back_or_give_up(self, job_id: str, queue: Queue | None, known: bool) -> None:
        """Put a lost job back on `queue` (`known`: RQ still has its entry; None: which queue
        is not known), or fail it once it was lost more than MAX_TIMES_LOST times."""
        job_key = self.store.keys.job(job_id)
        times = int(self.redis.eval(_COUNT_A_LOSS, 1, job_key, TIMES_LOST_FIELD))  # type: ignore[arg-type]
        if times < 0:
            return  # it started, or ended, since the pass read it
        if times <= MAX_TIMES_LOST:
            if queue is None:
                log.error("generation %s is lost and its queue cannot be told", job_id)
                return
            log.warning("generation %s was lost by a dequeue; back on %s", job_id, queue.name)
            if known:
                queue.push_job_id(job_id, at_front=True)  # it has waited its turn already
            else:
                enqueue_generation(queue, job_id, self.settings)
            return
        log.error("generation %s was lost by %d dequeues; failed", job_id, times)
        error = ErrorInfo(
            code=ErrorCode.WORKER_LOST,
            message=f"workers took this job off its queue {times} times and none started it; "
            "their logs say why",
        )
        end_queued(self.store, job_id, JobStatus.FAILED, queue, error)

