"""Cancelling a job: the one place both the cancel route and the OpenAI route's timeout use.

A running job is told through its cancel flag and stops between two steps (the worker records
`canceled`). A queued job is canceled right here: its record moves to `canceled`, and its RQ
entry leaves the queue and Redis, so no worker dequeues it and nothing is left to expire.
"""

from __future__ import annotations

import time

from rq.job import Job

from contract import histograms
from contract.jobs import JobEvent, JobRecord, JobStatus
from contract.webhook_queue import enqueue_webhook
from service.services import ApiServices


def cancel(services: ApiServices, record: JobRecord) -> bool:
    """Cancel `record`'s job unless it already ended; True when a queued job was canceled now."""
    if record.status.is_terminal:
        return False
    services.store.request_cancel(record.id)
    now = time.time()
    event = JobEvent(type="canceled", status=JobStatus.CANCELED, at=now)
    if not services.store.transition(
        record.id, [JobStatus.QUEUED], JobStatus.CANCELED, event, {"finished_at": now}
    ):
        return False  # running (the worker stops it) or ended meanwhile
    services.queue_for(record.params.model, record.origin.priority).remove(record.id)
    services.redis.delete(Job.key_for(record.id))
    histograms.count_finished(services.redis, services.keys, JobStatus.CANCELED.value)
    enqueue_webhook(services.redis, services.keys, record, "completed")
    return True
