"""Ending a job that has not started: the cancel route, the OpenAI route's timeout, and the
jobs of a model no longer served (service.retired_models) all come through here.

A running job is told through its cancel flag and stops between two steps (the worker records
`canceled`). A queued job is ended right here: its record moves to its final status, and its RQ
entry leaves the queue and Redis, so no worker dequeues it and nothing is left to expire.
"""

from __future__ import annotations

import time

from redis.exceptions import WatchError
from rq.job import Job

from contract import histograms
from contract.jobs import ErrorInfo, EventType, JobEvent, JobRecord, JobStatus
from contract.state import decode_record
from contract.webhook_queue import schedule, wants_webhook, webhook_delivery
from service.services import ApiServices

# The statuses a queued job can be ended with here, and the event each one records.
_ENDINGS: dict[JobStatus, EventType] = {JobStatus.CANCELED: "canceled", JobStatus.FAILED: "failed"}

# A job ended here from `queued` carries this field until its follow-ups (its RQ entry dropped,
# the finished count, the `completed` webhook) are done: set with the status, cleared with them.
_TIDY_PENDING = "tidy_pending"


def cancel(services: ApiServices, record: JobRecord) -> bool:
    """Cancel `record`'s job unless it already ended; True when a queued job was canceled now."""
    if record.status is JobStatus.CANCELED:
        _tidy(services, record)  # in case a lost reply cut the first short
        return False
    if record.status.is_terminal:
        return False
    services.store.request_cancel(record.id)
    return end_queued(services, record, JobStatus.CANCELED)


def end_queued(
    services: ApiServices, record: JobRecord, status: JobStatus, error: ErrorInfo | None = None
) -> bool:
    """Move `record`'s job from `queued` to the terminal `status` and drop its RQ entry; False
    when it is no longer queued (a worker took it, or it ended meanwhile)."""
    now = time.time()
    event = JobEvent(type=_ENDINGS[status], status=status, at=now, error=error)
    fields: dict[str, object] = {"finished_at": now, _TIDY_PENDING: "1"}
    if error is not None:
        fields["error"] = error
    ended = services.store.transition(record.id, [JobStatus.QUEUED], status, event, fields)
    # Also when it did not end it now: an earlier call may have, and lost its connection
    # before the follow-ups (the client retries on the 503 and finds the job already ended).
    _tidy(services, record)
    return ended


def _tidy(services: ApiServices, record: JobRecord) -> None:
    """The follow-ups of a queued job ended here, if still pending: drop its RQ entry, count
    it, queue its `completed` webhook with the job as it ended. One transaction, once only: it
    clears the pending field, and runs only if the job's hash did not change since it looked."""
    job_key = services.keys.job(record.id)
    queue = services.queue_for(record.params.model, record.origin.priority)
    with services.redis.pipeline() as pipe:
        for _ in range(3):
            try:
                pipe.watch(job_key)
                if not pipe.hexists(job_key, _TIDY_PENDING):
                    return  # done already, or ended by a worker (which does its own)
                raw = pipe.hgetall(job_key)
                snapshot = decode_record(record.id, raw) or record  # type: ignore[arg-type]
                pipe.multi()
                pipe.hdel(job_key, _TIDY_PENDING)
                queue.remove(record.id, pipeline=pipe)
                pipe.delete(Job.key_for(record.id))
                histograms.count_finished(pipe, services.keys, snapshot.status.value)
                if wants_webhook(snapshot, "completed"):
                    delivery = webhook_delivery(snapshot, "completed", snapshot)
                    schedule(pipe, services.keys, delivery, time.time())
                pipe.execute()
                return
            except WatchError:
                continue  # another caller tidied it meanwhile (the next look says so)
