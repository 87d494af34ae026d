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
from contract.webhook_queue import enqueue_webhook
from service.services import ApiServices

# The statuses a queued job can be ended with here, and the event each one records.
_ENDINGS: dict[JobStatus, EventType] = {JobStatus.CANCELED: "canceled", JobStatus.FAILED: "failed"}


def cancel(services: ApiServices, record: JobRecord) -> bool:
    """Cancel `record`'s job unless it already ended; True when a queued job was canceled now."""
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
    fields: dict[str, object] = {"finished_at": now}
    if error is not None:
        fields["error"] = error
    if not services.store.transition(record.id, [JobStatus.QUEUED], status, event, fields):
        return False
    services.queue_for(record.params.model, record.origin.priority).remove(record.id)
    services.redis.delete(Job.key_for(record.id))
    histograms.count_finished(services.redis, services.keys, status.value)
    enqueue_webhook(services.redis, services.keys, record, "completed")
    return True
