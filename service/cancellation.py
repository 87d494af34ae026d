"""Ending a job that has not started: the cancel route, the OpenAI route's timeout, and the
jobs of a model no longer served (service.retired_models) all come through here.

A running job is told through its cancel flag and stops between two steps (the worker records
`canceled`). A queued job is ended right here: its record moves to its final status, and its RQ
entry leaves the queue and Redis, so no worker dequeues it and nothing is left to expire.
"""

from __future__ import annotations

from rq import Queue

from contract import endings
from contract.endings import pay_what_is_owed
from contract.jobs import ErrorInfo, JobRecord, JobStatus
from service.services import ApiServices


def cancel(services: ApiServices, record: JobRecord) -> bool:
    """Cancel `record`'s job unless it already ended; True when a queued job was canceled now."""
    if record.status is JobStatus.CANCELED:
        # In case a lost reply cut the first cancel short: what it still owes is paid now.
        pay_what_is_owed(services.store, record.id, queue=_queue_of(services, record))
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
    return endings.end_queued(
        services.store, record.id, status, _queue_of(services, record), error, retry_for_s=2.0
    )


def _queue_of(services: ApiServices, record: JobRecord) -> Queue:
    return services.queue_for(record.params.model, record.origin.priority)
