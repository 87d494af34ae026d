"""The RQ job function: one generation, from queued to a terminal status.

Every outcome is written to the job hash here, so the function returns normally for failures
too. What escapes it is a bug, or a Redis that stays away through the retries of the start
(`_start`) or of the final write (`_finish`) (RQ records it; worker.abandoned marks the record
failed, or pays what a landed ending owes). Writes the job does not depend on (webhooks,
histograms) never fail it.

Jobs are enqueued with `Retry(max=job_retries)` (contract.queueing), and RQ retries any failed
execution while retries are left: one whose function raised (above), and one whose worker died
mid-job (SIGKILL, the OOM killer, the stall watchdog's exit, this module's exit after an
unrecoverable accelerator error: the reaper finds its lease lapsed, see worker.abandoned). A
retried run goes on only if the record is still live; one that has ended meanwhile (failed by
this run or by worker.abandoned's handler) is skipped.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.timeouts import JobTimeoutException

from contract import histograms
from contract.endings import Owed, end_job, pay_what_is_owed
from contract.exit_codes import EXIT_ACCELERATOR_BROKEN
from contract.jobs import (
    ErrorCode,
    ErrorInfo,
    GenerationParams,
    JobEvent,
    JobMetrics,
    JobRecord,
    JobStatus,
    OutputRecord,
    ProgressRecord,
)
from contract.redis_connection import retry_while_away
from contract.state import Attempt, UnreadableRecord
from contract.storage import StorageUnavailable
from contract.trace_context import job_id_var, request_id_var, traceparent_var
from contract.webhook_queue import enqueue_webhook
from worker.cancel_flag import RedisCancelFlag
from worker.engine_errors import (
    free_accelerator_memory,
    is_fatal_accelerator_error,
    is_out_of_memory,
)
from worker.outputs import store_images, store_video
from worker.progress_reporter import ThrottledProgress
from worker.resident import ResidentModel, WorkerRuntime, runtime

if TYPE_CHECKING:
    from selfcascade.request import GenerationRequest

log = logging.getLogger(__name__)

_LIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
PROGRESS_WEBHOOK_INTERVAL_S = 1.0
FINISH_RETRY_S = 30.0
# What a run returns when another attempt holds its job: RQ's books on the job (shared by the
# two runs) are left to that attempt (worker.process.GenerationWorker.handle_job_success).
HELD_ELSEWHERE = "held elsewhere"
START_RETRY_S = 10.0
# What a run returns when it cannot decode its job's record (written by a newer release): the
# job stays `queued` for a worker that can (worker.lost_jobs pushes it back).
UNREADABLE = "unreadable"
NOT_THIS_RUNS = frozenset({HELD_ELSEWHERE, UNREADABLE})  # RQ must not mark the job finished


def run_generation(job_id: str) -> str:
    rt = runtime()
    try:
        record = rt.store.get(job_id)
    except UnreadableRecord as exc:
        # Left `queued`: the lost-jobs pass puts it back for a worker that can read it, and
        # fails it when none has after a few tries (worker.lost_jobs).
        log.error("%s; left for a worker that can read it", exc)
        return UNREADABLE
    if record is None or record.status.is_terminal:
        if record is not None:
            # Ended while it waited (or by a run whose reply was lost): it may still owe its
            # count and webhook.
            pay_what_is_owed(rt.store, job_id)
        return "skipped"
    # The request's ids follow the job into this process's logs (contract.log_format).
    tokens = (
        job_id_var.set(job_id),
        request_id_var.set(record.origin.request_id),
        traceparent_var.set(record.origin.traceparent),
    )
    try:
        return _run(rt, record)
    finally:
        job_id_var.reset(tokens[0])
        request_id_var.reset(tokens[1])
        traceparent_var.reset(tokens[2])


def _run(rt: WorkerRuntime, record: JobRecord) -> str:
    job_id = record.id
    if rt.store.cancel_requested(job_id):
        _finish(rt, record, JobStatus.CANCELED)
        return JobStatus.CANCELED.value
    if _held_by_a_live_worker(rt, record):
        # A second copy of a job another worker is running (pushed back by a lost-jobs pass
        # that raced with a slow start): that run owns it.
        log.warning("generation %s is running on %s; this copy is dropped", job_id, record.worker)
        return HELD_ELSEWHERE

    started_at = time.time()
    event = JobEvent(
        type="started",
        status=JobStatus.RUNNING,
        at=started_at,
        data={"attempt": record.attempts + 1, "worker": rt.worker_name},
    )
    fields = {
        "started_at": started_at,
        "attempts": record.attempts + 1,
        "worker": rt.worker_name,
        "progress": "",
    }
    if not _start(rt, record, event, fields):
        # Ended between the read and the transition, or another attempt started first.
        head = rt.store.head(job_id)
        running_elsewhere = head is not None and head.status == JobStatus.RUNNING.value
        return HELD_ELSEWHERE if running_elsewhere else "skipped"
    attempt = Attempt(rt.worker_name, record.attempts + 1)
    log.info(
        "generation %s started (attempt %d, traceparent %s)",
        job_id, record.attempts + 1, record.origin.traceparent,
    )
    with _advisory(job_id, "the start webhook"):
        enqueue_webhook(rt.store.redis, rt.store.keys, record, "start")
    if record.attempts == 0:
        with _advisory(job_id, "the queue-wait histogram"):
            histograms.observe(
                rt.store.redis, rt.store.keys, histograms.QUEUE_WAIT, started_at - record.created_at
            )
    return _generate(rt, record, started_at, attempt)


def _held_by_a_live_worker(rt: WorkerRuntime, record: JobRecord) -> bool:
    """Whether another worker, still alive (its presence key), runs this job now. A record left
    `running` by a worker that died is taken over (the reaper's requeue may not have landed)."""
    if record.status is not JobStatus.RUNNING or record.worker in (None, rt.worker_name):
        return False
    return bool(rt.store.redis.exists(rt.store.keys.worker(str(record.worker))))


def _start(rt: WorkerRuntime, record: JobRecord, event: JobEvent, fields: dict[str, Any]) -> bool:
    """Move the job to `running` as this worker's attempt; False when it ended, or another
    attempt started, meanwhile. The move counts the attempts it expects, so it lands once
    however often it is sent: after a lost reply it is checked, and sent again if it did not
    land, for up to START_RETRY_S (then the error goes to RQ: its retry, or the lost-jobs pass,
    runs the job again)."""
    deadline = time.monotonic() + START_RETRY_S
    while True:
        try:
            return rt.store.transition(
                record.id, _LIVE, JobStatus.RUNNING, event, fields, if_attempts=record.attempts
            )
        except (RedisConnectionError, RedisTimeoutError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)
        try:
            now = rt.store.get(record.id)
        except (RedisConnectionError, RedisTimeoutError):
            continue
        if now is None or now.attempts != record.attempts:
            # Ours landed (this attempt named), or another attempt or an ending came first.
            return now is not None and now.status is JobStatus.RUNNING and (
                now.worker, now.attempts
            ) == (fields["worker"], fields["attempts"])
        # Not landed: the same move again (it cannot land twice).


@contextmanager
def _advisory(job_id: str, what: str) -> Iterator[None]:
    """A write the job does not depend on (a webhook, a histogram): a Redis error is logged,
    never allowed to throw away the generation."""
    try:
        yield
    except RedisError as exc:
        log.warning("generation %s: %s not written (%s)", job_id, what, exc)


def _generate(
    rt: WorkerRuntime, record: JobRecord, started_at: float, attempt: Attempt
) -> str:
    """Run the job on its model and end it: succeeded, failed or canceled (or left to another
    attempt that holds it now)."""
    model = _resident_model(rt, record.params)
    if isinstance(model, str):
        return _fail(rt, record, attempt, ErrorCode.MODEL_UNAVAILABLE, model)
    request = _engine_request(record.params)
    progress = ThrottledProgress(
        rt.store,
        record.id,
        attempt,
        rt.settings.progress_interval_s,
        on_written=_progress_webhook(rt, record),
        on_step=rt.watchdog.beat,
    )
    hooks = model.stage_hooks(record.params)
    cancel = RedisCancelFlag(rt.store, record.id, attempt)
    try:
        result = model.engine.generate(
            request, on_progress=progress, cancel=cancel, stage_hooks=hooks
        )
        rt.watchdog.beat()  # decoded; encoding and uploading get a full allowance of their own
        if not _still_ours(rt, record, attempt):
            return HELD_ELSEWHERE
        outputs = _store(rt, record, result, model.spec.produces_video)
    except Exception as exc:
        return _end_after_error(rt, record, attempt, cancel, exc)
    return _succeed(rt, record, attempt, result, outputs, started_at, progress, hooks)


def _resident_model(rt: WorkerRuntime, params: GenerationParams) -> ResidentModel | str:
    """The model of this worker that runs the job, or why there is none."""
    model = rt.models.get(params.model)
    if model is None:
        # Only a job from the shared queues of releases before per-model queues gets here.
        return f"model {params.model} is not loaded on the worker that took this job"
    video = model.spec.produces_video  # load_models checked it against the engine
    if video != params.is_video:
        held, asked = ("video", "an image") if video else ("images", "a video")
        return (
            f"model {params.model} produces {held} on this worker but the API accepted {asked} "
            "job for it: the API's and the worker's models files disagree"
        )
    return model


def _engine_request(params: GenerationParams) -> GenerationRequest:
    from selfcascade.request import GenerationRequest

    return GenerationRequest(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        width=params.width,
        height=params.height,
        steps=params.steps,
        guidance_scale=params.guidance_scale,
        seed=params.seed,
        pivot_strength=params.pivot_strength,
        upsample_mode=params.upsample_mode,
        lr_features=params.lr_features,
        scheduler=params.scheduler,
        method=params.method,
        num_frames=params.num_frames,
    )


def _end_after_error(
    rt: WorkerRuntime, record: JobRecord, attempt: Attempt, cancel: RedisCancelFlag,
    exc: Exception,
) -> str:
    """End a run that raised `exc` as its type says: canceled, failed with the error code it
    maps to, or left to the attempt that superseded it. Called while `exc` is being handled
    (log.exception logs it). An unrecoverable accelerator error fails the job, then ends the
    process for a restart."""
    from selfcascade.errors import GenerationCancelled, InvalidRequest

    if isinstance(exc, GenerationCancelled):
        if cancel.superseded:
            return HELD_ELSEWHERE  # its new run, or the reaper's verdict, stands
        _finish(rt, record, JobStatus.CANCELED, attempt)
        return JobStatus.CANCELED.value
    if isinstance(exc, InvalidRequest):
        return _fail(rt, record, attempt, ErrorCode.INVALID_REQUEST, str(exc))
    if isinstance(exc, JobTimeoutException):
        return _fail(
            rt, record, attempt, ErrorCode.TIMEOUT, f"exceeded {rt.settings.job_timeout_s}s"
        )
    if isinstance(exc, StorageUnavailable):
        log.error("storing the result of %s failed: %s", record.id, exc)
        return _fail(rt, record, attempt, ErrorCode.STORAGE_UNAVAILABLE, str(exc))
    if is_out_of_memory(exc):
        free_accelerator_memory(exc)
        return _fail(
            rt, record, attempt, ErrorCode.OUT_OF_MEMORY,
            "out of memory at this size; a smaller size (or fewer frames) may fit",
        )
    log.exception("generation %s failed", record.id)
    outcome = _fail(rt, record, attempt, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
    if is_fatal_accelerator_error(exc):
        # The job is recorded as failed; the orchestrator restarts a clean process.
        log.critical("unrecoverable accelerator error: worker exits for a restart")
        os._exit(EXIT_ACCELERATOR_BROKEN)
    return outcome


def _succeed(
    rt: WorkerRuntime,
    record: JobRecord,
    attempt: Attempt,
    result: Any,
    outputs: list[OutputRecord],
    started_at: float,
    progress: ThrottledProgress,
    hooks: list[Any],
) -> str:
    """End the job succeeded, with its outputs and metrics."""
    inference_s = result.total_seconds
    with _advisory(record.id, "the inference histogram"):
        histograms.observe(rt.store.redis, rt.store.keys, histograms.INFERENCE, inference_s)
    metrics = JobMetrics(
        queue_s=started_at - record.created_at,
        inference_s=inference_s,
        stage_seconds=result.stage_seconds,
        stage_sizes=[(size.width, size.height) for size in result.stages],
        unet_evaluations=result.unet_evaluations,
        # Upsamplers act only inside re-noise stages: a single-stage run was not tuned.
        tuned=bool(hooks) and len(result.stages) > 1,
    )
    # The last step seen, written with the ending: its own write may have been lost to a Redis
    # blip, which left a succeeded job showing the progress of a step long past.
    final = {"progress": progress.last} if progress.last else {}
    _finish(
        rt, record, JobStatus.SUCCEEDED, attempt, outputs=outputs, metrics=metrics, **final
    )
    return JobStatus.SUCCEEDED.value


def _still_ours(rt: WorkerRuntime, record: JobRecord, attempt: Attempt) -> bool:
    """Whether this run may store its result: a worker cut off from Redis past its lease finds
    the job requeued, or run by another worker, and must not overwrite that run's files. Asked
    again while Redis is away, for up to FINISH_RETRY_S; then taken as ours (a finished result
    is not thrown away for a question Redis cannot answer: the final write's attempt check
    still refuses it if another attempt holds the job)."""
    try:
        ours = retry_while_away(lambda: rt.store.holds(record.id, attempt), FINISH_RETRY_S)
    except (RedisConnectionError, RedisTimeoutError):
        log.warning("generation %s: cannot ask Redis whose it is; storing", record.id)
        return True
    if not ours:
        log.warning("generation %s: another attempt holds it; this result is dropped", record.id)
    return ours


def _store(rt: WorkerRuntime, record: JobRecord, result: Any, video: bool) -> list[OutputRecord]:
    """The engine's result as stored files: a clip and its poster, or the images."""
    params = record.params
    if video:
        return store_video(rt.storage, record.id, result.frames, params, result.stage_seconds)
    return store_images(rt.storage, record.id, result.images, params, result.stage_seconds)


def _progress_webhook(rt: WorkerRuntime, record: JobRecord) -> Callable[[ProgressRecord], None]:
    """Progress webhooks at most once a second, plus the end of every stage."""
    sent_at = 0.0

    def notify(progress: ProgressRecord) -> None:
        nonlocal sent_at
        now = time.monotonic()
        if progress.step == progress.steps or now - sent_at >= PROGRESS_WEBHOOK_INTERVAL_S:
            sent_at = now
            with _advisory(record.id, "a progress webhook"):
                enqueue_webhook(rt.store.redis, rt.store.keys, record, "progress")

    return notify


def _fail(
    rt: WorkerRuntime, record: JobRecord, attempt: Attempt, code: ErrorCode, message: str
) -> str:
    log.warning("generation %s failed: %s %s", record.id, code.value, message)
    _finish(rt, record, JobStatus.FAILED, attempt, error=ErrorInfo(code=code, message=message))
    return JobStatus.FAILED.value


def _finish(
    rt: WorkerRuntime,
    record: JobRecord,
    status: JobStatus,
    attempt: Attempt | None = None,
    **fields: object,
) -> None:
    """The job's terminal status and what follows it (contract.endings), as `attempt` (None:
    before this worker started it). A finished result is worth waiting for: a lost connection
    is tried again for FINISH_RETRY_S before the error goes to RQ (whose handler pays what a
    landed ending owes)."""
    now = time.time()
    error = fields.get("error")
    event = JobEvent(
        type=status.value,  # type: ignore[arg-type]
        status=status,
        at=now,
        error=error if isinstance(error, ErrorInfo) else None,
    )
    if end_job(
        rt.store, record.id, _LIVE, status, event, {"finished_at": now, **fields}, Owed.RAN,
        attempt=attempt, retry_for_s=FINISH_RETRY_S,
    ):
        log.info("generation %s %s", record.id, status.value)
    else:
        log.warning(
            "generation %s: not %s by this run (it ended meanwhile, or a later attempt holds "
            "it)", record.id, status.value,
        )
