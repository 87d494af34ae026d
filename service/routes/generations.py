"""The generation lifecycle: create, read, stream, cancel, download."""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

import redis.exceptions
from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from contract import histograms
from contract.jobs import ErrorCode, JobEvent, JobRecord, JobStatus
from contract.queueing import enqueue_generation
from contract.state import decode_events, decode_record
from contract.storage.base import CONTENT_TYPES
from service.deps import Services
from service.errors import ApiError
from service.schemas import GenerationCreate, GenerationView, OutputView
from service.validation import normalise

router = APIRouter(prefix="/v1/generations", tags=["generations"])

_JOB_ID = re.compile(r"^[a-f0-9]{32}$")
IDEMPOTENCY_TTL_S = 24 * 3600
MAX_PREFER_WAIT_S = 60


@router.post("", status_code=202, response_model=GenerationView)
def create_generation(
    body: GenerationCreate,
    services: Services,
    request: Request,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    prefer: Annotated[str | None, Header()] = None,
) -> GenerationView:
    params = normalise(body, services.models, services.settings)
    if len(services.queue) >= services.settings.max_queue_length:
        raise ApiError(
            429, ErrorCode.QUEUE_FULL, "the queue is full; retry later", None, {"Retry-After": "5"}
        )

    job_id = uuid.uuid4().hex
    if idempotency_key:
        existing = _claim_idempotency_key(services, idempotency_key, body, job_id)
        if existing is not None:
            response.headers["Location"] = f"/v1/generations/{existing}"
            return _view(services, request, _load(services, existing))

    record = services.store.create(job_id, params, time.time())
    try:
        enqueue_generation(services.queue, job_id, services.settings)
    except redis.exceptions.RedisError:
        # Never leave a record that no worker will ever pick up.
        services.store.transition(job_id, [JobStatus.QUEUED], JobStatus.FAILED, None)
        raise
    response.headers["Location"] = f"/v1/generations/{job_id}"
    wait_s = _preferred_wait(prefer)
    if wait_s and _wait_for_terminal(services, job_id, wait_s):
        response.status_code = 200
        response.headers["Preference-Applied"] = f"wait={wait_s}"
        return _view(services, request, _load(services, job_id))
    return _view(services, request, record)


@router.get("/{job_id}", response_model=GenerationView)
async def get_generation(job_id: str, services: Services, request: Request) -> GenerationView:
    # The hot path clients poll: asyncio Redis, no threadpool hop.
    record = None
    if _JOB_ID.match(job_id):
        raw = await services.async_redis.hgetall(services.keys.job(job_id))
        record = decode_record(job_id, raw)
    if record is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no generation {job_id}", "job_id")
    position = None
    if record.status is JobStatus.QUEUED:
        found = await services.async_redis.lpos(services.queue.key, job_id)
        position = found if isinstance(found, int) else None
    return _view(services, request, record, position)


@router.post("/{job_id}/cancel", response_model=GenerationView)
def cancel_generation(
    job_id: str, services: Services, request: Request, response: Response
) -> GenerationView:
    record = _load(services, job_id)
    if record.status.is_terminal and record.status is not JobStatus.CANCELED:
        raise ApiError(
            409, ErrorCode.CONFLICT, f"generation already {record.status.value}", "job_id"
        )
    if record.status is not JobStatus.CANCELED:
        # The flag stops a running job between two steps; a queued one is canceled right here.
        services.store.request_cancel(job_id)
        now = time.time()
        event = JobEvent(type="canceled", status=JobStatus.CANCELED, at=now)
        if services.store.transition(
            job_id, [JobStatus.QUEUED], JobStatus.CANCELED, event, {"finished_at": now}
        ):
            services.queue.remove(job_id)
            histograms.count_finished(services.redis, services.keys, JobStatus.CANCELED.value)
        response.status_code = 202
    return _view(services, request, _load(services, job_id))


@router.get("/{job_id}/events")
async def generation_events(
    job_id: str,
    services: Services,
    request: Request,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Server-sent events: every status change and progress step, ending at a terminal one."""
    if not _JOB_ID.match(job_id) or not await services.async_redis.exists(
        services.keys.events(job_id)
    ):
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no generation {job_id}", "job_id")
    stream_key = services.keys.events(job_id)
    keepalive_ms = int(services.settings.sse_keepalive_s * 1000)

    async def stream() -> AsyncIterator[str]:
        after = last_event_id or "0"
        while not await request.is_disconnected():
            try:
                reply = await services.async_redis.xread(
                    {stream_key: after}, block=keepalive_ms, count=100
                )
            except redis.exceptions.RedisError:
                yield 'event: error\ndata: {"code": "redis_unavailable"}\n\n'
                return
            if not reply:
                yield ": keepalive\n\n"
                continue
            for entry_id, event in decode_events(reply):
                after = entry_id
                yield f"id: {entry_id}\nevent: {event.type}\ndata: {event.model_dump_json()}\n\n"
                if event.status.is_terminal:
                    return

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


@router.get("/{job_id}/outputs/{index}", name="download_output", response_model=None)
def download_output(
    job_id: str, index: int, services: Services
) -> StreamingResponse | RedirectResponse:
    record = _load(services, job_id)
    output = next((o for o in record.outputs if o.index == index), None)
    if output is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"generation {job_id} has no output {index}")
    url = services.storage.presigned_url(output.key, services.settings.presign_expiry_s)
    if url is not None:
        return RedirectResponse(url, status_code=307)
    try:
        chunks = services.storage.open(output.key)
    except FileNotFoundError:
        raise ApiError(404, ErrorCode.NOT_FOUND, "the result has expired", None) from None
    headers = {"Content-Length": str(output.bytes), "ETag": f'"{output.sha256}"'}
    return StreamingResponse(chunks, media_type=CONTENT_TYPES[output.format], headers=headers)


def _preferred_wait(prefer: str | None) -> int:
    """Seconds from `Prefer: wait=N` (RFC 7240), capped so a request never holds a thread long."""
    for part in (prefer or "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "wait" and value.strip().isdigit():
            return min(int(value), MAX_PREFER_WAIT_S)
    return 0


def _wait_for_terminal(services: Services, job_id: str, wait_s: int) -> bool:
    deadline = time.monotonic() + wait_s
    after = "0"
    while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
        # Short blocks: the API's Redis socket timeout (3 s) must never fire on a quiet job.
        block_ms = min(left_ms, 1000)
        for entry_id, event in services.store.read_events(job_id, after, block_ms=block_ms):
            after = entry_id
            if event.status.is_terminal:
                return True
    return False


def _load(services: Services, job_id: str) -> JobRecord:
    record = services.store.get(job_id) if _JOB_ID.match(job_id) else None
    if record is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no generation {job_id}", "job_id")
    return record


def _claim_idempotency_key(
    services: Services, key: str, body: GenerationCreate, job_id: str
) -> str | None:
    """None if this request owns the key; the earlier job id if it is a replay; 409 if reused."""
    fingerprint = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    redis_key = services.keys.idempotency(hashlib.sha256(key.encode()).hexdigest())
    value = f"{job_id}:{fingerprint}"
    if services.redis.set(redis_key, value, nx=True, ex=IDEMPOTENCY_TTL_S):
        return None
    stored: bytes | None = services.redis.get(redis_key)  # type: ignore[assignment]
    earlier_id, earlier_fp = (stored.decode() if stored else value).split(":", 1)
    if earlier_fp != fingerprint:
        raise ApiError(
            409,
            ErrorCode.CONFLICT,
            "Idempotency-Key was already used with a different body",
            "Idempotency-Key",
        )
    return earlier_id


def _view(
    services: Services, request: Request, record: JobRecord, position: int | None = -1
) -> GenerationView:
    """The public view; `position` -1 means "look it up" (sync callers)."""
    if record.status is not JobStatus.QUEUED:
        position = None
    elif position == -1:
        position = services.queue.get_job_position(record.id)
    outputs = [
        OutputView(
            url=str(request.url_for("download_output", job_id=record.id, index=o.index)),
            width=o.width,
            height=o.height,
            format=o.format,
            bytes=o.bytes,
            sha256=o.sha256,
        )
        for o in record.outputs
    ]
    return GenerationView(
        id=record.id,
        status=record.status,
        model=record.params.model,
        params=record.params,
        progress=record.progress,
        queue_position=position,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        attempts=record.attempts,
        outputs=outputs,
        error=record.error,
        metrics=record.metrics,
    )
