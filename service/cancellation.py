"""Ending a job that has not started: the cancel route, the OpenAI route's timeout, and the
jobs of a model no longer served (service.retired_models) all come through here.

A running job is told through its cancel flag and stops between two steps (the worker records
`canceled`). A queued job is ended right here: its record moves to its final status, and its RQ
entry leaves the queue and Redis, so no worker dequeues it and nothing is left to expire.
"""

from __future__ import annotations

import time

from rq.job import Job

from contract import histograms
from contract.jobs import ErrorInfo, EventType, JobEvent, JobRecord, JobStatus
from contract.webhook_queue import wants_webhook, webhook_delivery
from service.services import ApiServices

# The statuses a queued job can be ended with here, and the event each one records.
_ENDINGS: dict[JobStatus, EventType] = {JobStatus.CANCELED: "canceled", JobStatus.FAILED: "failed"}

# A job ended here from `queued` carries this field until its follow-ups (its RQ entry dropped,
# the finished count, the `completed` webhook) are done: set with the status, cleared with them.
_TIDY_PENDING = "tidy_pending"
# KEYS: job hash, queue list, RQ job hash, finished counts (contract.histograms), webhooks
# (contract.webhook_queue.schedule). ARGV: pending field, job id, status, delivery JSON ('' for
# none), its due time. Once only: whoever clears the field does the rest, in the same step.
_TIDY = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('LREM', KEYS[2], 0, ARGV[2])
redis.call('DEL', KEYS[3])
redis.call('HINCRBY', KEYS[4], ARGV[3], 1)
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[5], ARGV[5], ARGV[4]) end
return 1
"""


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
    it, queue its `completed` webhook with the job as it ended."""
    job_key = services.keys.job(record.id)
    if not services.redis.hexists(job_key, _TIDY_PENDING):
        return  # done already, or ended by a worker (which does its own)
    snapshot = services.store.get(record.id) or record
    delivery = ""
    if wants_webhook(snapshot, "completed"):
        delivery = webhook_delivery(snapshot, "completed", snapshot).model_dump_json()
    queue = services.queue_for(record.params.model, record.origin.priority)
    keys = [
        job_key, queue.key, Job.key_for(record.id),
        services.keys.histogram(histograms.JOBS_FINISHED), services.keys.webhooks(),
    ]
    args = [_TIDY_PENDING, record.id, snapshot.status.value, delivery, time.time()]
    services.redis.register_script(_TIDY)(keys=keys, args=args)
