"""What happens to our job record when RQ gives up on an execution.

RQ's StartedJobRegistry.cleanup finds executions whose lease expired (the worker died: SIGKILL,
OOM-killer, node loss) and either re-enqueues the job (retries left) or fails it. It calls the
exception handlers passed to it with AbandonedJobError; this handler mirrors that decision in
the job hash so clients see `queued` (then `running` again) or `failed: worker_lost`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rq.exceptions import AbandonedJobError
from rq.job import Job

from contract import histograms
from contract.jobs import ErrorCode, ErrorInfo, JobEvent, JobStatus
from contract.state import JobStore
from contract.webhook_queue import enqueue_webhook

log = logging.getLogger(__name__)


def make_exception_handler(store: JobStore) -> Any:
    def on_job_exception(job: Job, exc_type: type, exc_value: BaseException, tb: Any) -> bool:
        record = store.get(job.id)
        if record is None or record.status.is_terminal:
            return True
        now = time.time()
        live = [JobStatus.QUEUED, JobStatus.RUNNING]
        if exc_type is AbandonedJobError and (job.retries_left or 0) > 0:
            log.warning("generation %s: worker %s died mid-job; requeued", job.id, record.worker)
            event = JobEvent(
                type="requeued", status=JobStatus.QUEUED, at=now, data={"worker": record.worker}
            )
            store.transition(job.id, live, JobStatus.QUEUED, event, {"progress": ""})
            return True
        if exc_type is AbandonedJobError:
            error = ErrorInfo(
                code=ErrorCode.WORKER_LOST, message="the worker died; no retries left"
            )
        else:
            error = ErrorInfo(code=ErrorCode.INTERNAL, message=f"{exc_type.__name__}: {exc_value}")
        event = JobEvent(type="failed", status=JobStatus.FAILED, at=now, error=error)
        fields = {"finished_at": now, "error": error}
        if store.transition(job.id, live, JobStatus.FAILED, event, fields):
            histograms.count_finished(store.redis, store.keys, JobStatus.FAILED.value)
            latency = now - record.created_at
            histograms.observe(store.redis, store.keys, histograms.E2E_LATENCY, latency)
            enqueue_webhook(store.redis, store.keys, record, "completed")
        return True

    return on_job_exception
