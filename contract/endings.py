"""The end of a job and what it owes afterwards: counted once, its `completed` webhook once.

A terminal status is one script (contract.state); what follows it (the finished count, the
end-to-end latency, the webhook and, for a job ended before any worker took it, its RQ entry)
takes more commands. A reply lost between the two, or a process killed there, would leave a
finished job never counted and its webhook never sent. So the status is written together with
a field naming what is still owed, and one transaction does all of it and clears the field.
Whoever meets the field later finishes the job off: a retried cancel, the worker that dequeues
a job ended meanwhile, RQ's exception handler (worker/abandoned.py) after a lost reply or a
killed worker.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Iterable, Mapping

from redis.exceptions import WatchError
from rq import Queue
from rq.job import Job

from contract import histograms
from contract.jobs import ErrorInfo, EventType, JobEvent, JobRecord, JobStatus
from contract.redis_connection import retry_while_away
from contract.state import Attempt, JobStore, UnreadableRecord, as_text, decode_record
from contract.webhook_queue import schedule, wants_webhook, webhook_delivery

log = logging.getLogger(__name__)

OWED_FIELD = "follow_ups_owed"


class Owed(enum.StrEnum):
    RAN = "ran"  # ended by a worker or its reaper: its count, its latency, its webhook
    NEVER_STARTED = "never_started"  # ended in the queue: its count and webhook, no latency


def end_job(
    store: JobStore,
    job_id: str,
    allowed: Iterable[JobStatus],
    status: JobStatus,
    event: JobEvent,
    fields: Mapping[str, object],
    owed: Owed,
    *,
    queue: Queue | None = None,
    attempt: Attempt | None = None,
    retry_for_s: float = 0.0,
) -> bool:
    """Move the job from one of `allowed` to the terminal `status`, then pay what it owes
    (`queue`: also drop its RQ entry there; `attempt`: only while the record names it). True
    when this call ended it.

    A lost connection is tried again for `retry_for_s`: the move is conditional, so a retry
    after one that did land changes nothing, and its follow-ups are still paid once.
    """
    ended = retry_while_away(
        lambda: store.transition(
            job_id, allowed, status, event, {**fields, OWED_FIELD: owed.value}, attempt
        ),
        retry_for_s,
    )
    pay_what_is_owed(store, job_id, queue=queue)
    return ended


# The statuses a queued job can be ended with, and the event each one records.
_QUEUED_ENDINGS: dict[JobStatus, EventType] = {
    JobStatus.CANCELED: "canceled", JobStatus.FAILED: "failed"
}


def end_queued(
    store: JobStore,
    job_id: str,
    status: JobStatus,
    queue: Queue | None,
    error: ErrorInfo | None = None,
    retry_for_s: float = 0.0,
) -> bool:
    """Move a job from `queued` to the terminal `status` (with `error`) and drop its RQ entry
    from `queue` (None: not known): the API's cancels and retired models, the lost-jobs pass
    giving up. False when it is no longer queued (a worker took it, or it ended meanwhile)."""
    now = time.time()
    event = JobEvent(type=_QUEUED_ENDINGS[status], status=status, at=now, error=error)
    fields: dict[str, object] = {"finished_at": now}
    if error is not None:
        fields["error"] = error
    return end_job(
        store, job_id, [JobStatus.QUEUED], status, event, fields, Owed.NEVER_STARTED,
        queue=queue, retry_for_s=retry_for_s,
    )


def pay_what_is_owed(store: JobStore, job_id: str, *, queue: Queue | None = None) -> bool:
    """The follow-ups of an ended job, if still owed: one transaction, once only (it clears the
    field and runs only if the job's hash did not change since it looked). `queue`: the API's
    hand, which also drops the RQ entry of a job ended before any worker took it (a worker
    passes none: RQ still keeps its books on the job it holds). True when this call paid."""
    job_key = store.keys.job(job_id)
    with store.redis.pipeline() as pipe:
        for _ in range(3):
            try:
                pipe.watch(job_key)
                raw = {as_text(k): as_text(v) for k, v in pipe.hgetall(job_key).items()}  # type: ignore[union-attr]
                owed = raw.get(OWED_FIELD)
                if owed is None or "status" not in raw:
                    return False  # paid already, or ended before anything was owed
                snapshot = _readable(job_id, raw)
                pipe.multi()
                pipe.hdel(job_key, OWED_FIELD)
                if queue is not None and owed == Owed.NEVER_STARTED:
                    queue.remove(job_id, pipeline=pipe)
                    pipe.delete(Job.key_for(job_id))
                histograms.count_finished(pipe, store.keys, raw["status"])
                latency = _latency(raw) if owed == Owed.RAN else None
                if latency is not None:
                    histograms.add_observation(pipe, store.keys, histograms.E2E_LATENCY, latency)
                if snapshot is not None and wants_webhook(snapshot, "completed"):
                    delivery = webhook_delivery(snapshot, "completed", snapshot)
                    schedule(pipe, store.keys, delivery, time.time())
                pipe.execute()
                return True
            except WatchError:
                continue  # the job changed meanwhile (another payer): look again
    return False


def _readable(job_id: str, raw: dict[str, str]) -> JobRecord | None:
    """The record, or None when this release cannot decode it (written by a newer one): its
    count and latency are paid from the plain fields all the same, its webhook cannot be."""
    try:
        return decode_record(job_id, raw)
    except UnreadableRecord as exc:
        log.error("%s: its `completed` webhook is not sent", exc)
        return None


def _latency(raw: dict[str, str]) -> float | None:
    try:
        return float(raw["finished_at"]) - float(raw["created_at"])
    except (KeyError, ValueError):
        return None
