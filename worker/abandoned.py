"""What happens to our job record when RQ gives up on an execution.

RQ's StartedJobRegistry.cleanup finds executions whose lease expired (the worker died: SIGKILL,
OOM-killer, node loss) and either re-enqueues the job (retries left) or fails it. It calls the
exception handlers passed to it with AbandonedJobError; this handler mirrors that decision in
the job hash so clients see `queued` (then `running` again) or `failed: worker_lost`.

It judges from the record's head (status, worker, attempts), never the whole record: mid-upgrade
a job run by a newer worker may carry fields this release cannot decode, and RQ's decision must
be mirrored all the same, or the record would say `running` for ever.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from rq.exceptions import AbandonedJobError
from rq.executions import Execution
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.utils import as_text, parse_composite_key

from contract.endings import Owed, end_job, pay_what_is_owed
from contract.jobs import ErrorCode, ErrorInfo, JobEvent, JobStatus
from contract.state import Attempt, JobStore

log = logging.getLogger(__name__)

_LIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
_KNOWN = frozenset(status.value for status in JobStatus)  # a newer release may write others


def make_exception_handler(store: JobStore) -> Any:
    def on_job_exception(job: Job, exc_type: type, exc_value: BaseException, tb: Any) -> bool:
        head = store.head(job.id)
        if head is None:
            return True
        if head.status not in _LIVE:
            if head.status in _KNOWN:
                pay_what_is_owed(store, job.id)  # its ending landed, its reply was lost
            else:
                log.error("generation %s: status %r is unknown here", job.id, head.status)
            return True
        now = time.time()
        live = [JobStatus.QUEUED, JobStatus.RUNNING]
        if exc_type is AbandonedJobError and _holder_runs_it(job, head.worker, now):
            # The lapsed lease was a second copy's (dropped as a duplicate, its worker killed
            # before RQ closed its books): the run that holds the job goes on, and the copy RQ
            # pushes back is dropped by whichever worker takes it.
            log.warning("generation %s: a copy's lease lapsed; %s still runs it", job.id,
                        head.worker)
            return True
        if exc_type is AbandonedJobError and (job.retries_left or 0) > 0:
            log.warning("generation %s: worker %s died mid-job; requeued", job.id, head.worker)
            event = JobEvent(
                type="requeued", status=JobStatus.QUEUED, at=now, data={"worker": head.worker}
            )
            store.transition(job.id, live, JobStatus.QUEUED, event, {"progress": ""})
            return True
        attempt = None
        if exc_type is AbandonedJobError:
            error = ErrorInfo(
                code=ErrorCode.WORKER_LOST, message="the worker died; no retries left"
            )
        else:
            # The run that raised speaks only for itself: a job it never started (its start
            # did not land), or that another attempt has taken over since, is not its to fail
            # (RQ's retry, or the lost-jobs pass, brings a never-started job back).
            running = head.status == JobStatus.RUNNING.value
            if not running or not head.worker or head.worker != job.worker_name:
                return True
            attempt = Attempt(head.worker, head.attempts)
            error = ErrorInfo(code=ErrorCode.INTERNAL, message=f"{exc_type.__name__}: {exc_value}")
        event = JobEvent(type="failed", status=JobStatus.FAILED, at=now, error=error)
        fields = {"finished_at": now, "error": error}
        end_job(store, job.id, live, JobStatus.FAILED, event, fields, Owed.RAN, attempt=attempt)
        return True

    return on_job_exception


def _holder_runs_it(job: Job, holder: str | None, now: float) -> bool:
    """Whether the record's holder runs the job under a lease that has not lapsed."""
    if not holder:
        return False
    registry = StartedJobRegistry(job.origin, connection=job.connection)
    entries: list[bytes] = job.connection.zrangebyscore(registry.key, now, "+inf")  # type: ignore[assignment]
    for entry in entries:
        job_id, execution_id = parse_composite_key(as_text(entry))
        if job_id != job.id:
            continue
        with contextlib.suppress(ValueError):  # an execution that ended meanwhile
            if Execution.fetch(execution_id, job_id, job.connection).worker_name == holder:
                return True
    return False
