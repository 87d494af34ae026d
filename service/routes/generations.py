"""The generation lifecycle: create, read, stream, cancel, download."""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

import anyio
import redis.exceptions
from fastapi import APIRouter, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from contract.jobs import ErrorCode, JobOrigin, JobRecord, JobStatus
from contract.state import as_text, decode_events, decode_record
from contract.storage.base import CONTENT_TYPES
from service.auth import Caller, Principal
from service.cancellation import cancel
from service.deps import Services
from service.errors import ApiError, pool_exhausted
from service.idempotency import IdempotencyClaim
from service.output_file import OutputFileResponse
from service.schemas import GenerationCreate, GenerationView
from service.services import BLOCKING_READ_S, ApiServices
from service.submission import OutcomeUnknown, origin_for, submit
from service.validation import normalise
from service.views import client_base_url, generation_view, job_url
from service.webhook_targets import WebhookPolicy, WebhookTarget, WebhookTargetRefused

router = APIRouter(prefix="/v1/generations", tags=["generations"])

_JOB_ID = re.compile(r"^[a-f0-9]{32}$")
# A Redis stream id, as the SSE stream sends it: milliseconds[-sequence], each below 2**64.
_STREAM_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")
_DECIMAL = re.compile(r"[0-9]{1,10}")
MAX_PREFER_WAIT_S = 60
REDIS_RETRY_S = 0.5  # a wait's pause before it asks a Redis that just failed again
REDIS_RETRY_WITHIN_S = 10.0
BLOCKING_READ_MS = int(BLOCKING_READ_S * 1000)
T = TypeVar("T")


@router.post("", status_code=202, response_model=GenerationView)
async def create_generation(
    body: GenerationCreate,
    services: Services,
    caller: Caller,
    request: Request,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    prefer: Annotated[str | None, Header()] = None,
) -> GenerationView:
    # Async so that `Prefer: wait` holds a wait slot, not a thread: the short blocking parts
    # take the shared pool, the wait itself is on the asyncio Redis client (wait_for_terminal).
    wait_s = _preferred_wait(prefer)  # before the job exists: a bad header costs nothing
    record = await run_in_threadpool(_create, body, services, caller, request, idempotency_key)
    # Absolute, like the output URLs: a page on another origin (CORS) resolving a relative one
    # against its own address would send the request, and its key, to its own server.
    response.headers["Location"] = job_url(client_base_url(services.settings, request), record.id)
    try:
        finished = wait_s > 0 and await _waited(request, services, record.id, wait_s)
        if finished:
            # No scope check: the caller made this job (a key may generate without `read`).
            reloaded: JobRecord | None = await run_in_threadpool(services.store.get, record.id)
            record = reloaded or record
        view = _view(services, request, record, await _queue_position(services, record))
    except redis.exceptions.RedisError:
        # The job exists: a Redis blip after its creation still answers 202 with its Location,
        # never a 503 that a client would retry into a second job.
        return _view(services, request, record, None)
    if finished:
        response.status_code = 200
        response.headers["Preference-Applied"] = f"wait={wait_s}"
    return view


def _create(
    body: GenerationCreate,
    services: ApiServices,
    caller: Principal,
    request: Request,
    idempotency_key: str | None,
) -> JobRecord:
    """The new generation's record, or the one an earlier request with this key made."""
    caller.require("generate")
    params = normalise(body, services.models, services.settings)
    origin = origin_of(request, caller, body)
    job_id = uuid.uuid4().hex
    idem = None
    if idempotency_key:
        idem = IdempotencyClaim(services, caller.bucket, idempotency_key, body)
        existing = idem.claim(job_id)
        if existing is not None:
            return existing
    try:
        [record] = submit(services, request.app.state.admission, caller, [params], origin, [job_id])
    except OutcomeUnknown:
        raise  # the job may exist: the claim stays, and a retry finds the job or waits it out
    except Exception:
        if idem is not None:
            idem.release()  # a refused request must not pin the key to a job never made
        raise
    return record


@router.get("/{job_id}", response_model=GenerationView)
async def get_generation(
    job_id: str, services: Services, caller: Caller, request: Request
) -> GenerationView:
    # The hot path clients poll: asyncio Redis, no threadpool hop.
    caller.require("read")
    record = None
    if _JOB_ID.match(job_id):
        raw = await services.async_redis.hgetall(services.keys.job(job_id))
        record = _visible(decode_record(job_id, raw), caller)
    if record is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no generation {job_id}", "job_id")
    return _view(services, request, record, await _queue_position(services, record))


@router.post("/{job_id}/cancel", response_model=GenerationView)
async def cancel_generation(
    job_id: str, services: Services, caller: Caller, request: Request, response: Response
) -> GenerationView:
    record = await run_in_threadpool(_cancel, services, job_id, caller, response)
    return _view(services, request, record, await _queue_position(services, record))


def _cancel(
    services: ApiServices, job_id: str, caller: Principal, response: Response
) -> JobRecord:
    """Cancels the job (202 while it is not canceled yet); its record as it reads afterwards."""
    record = _load(services, job_id, caller)
    if record.status.is_terminal and record.status is not JobStatus.CANCELED:
        raise ApiError(
            409, ErrorCode.CONFLICT, f"generation already {record.status.value}", "job_id"
        )
    cancel(services, record)  # also when canceled already: it finishes what a lost reply cut
    if record.status is not JobStatus.CANCELED:
        response.status_code = 202
    return _load(services, job_id, caller)


@router.get("/{job_id}/events")
async def generation_events(
    job_id: str,
    services: Services,
    caller: Caller,
    request: Request,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    """Server-sent events: every status change and progress step, ending at a terminal one."""
    caller.require("read")
    resume_after = _resume_after(last_event_id)
    if not _JOB_ID.match(job_id) or not await _owned_events(services, job_id, caller):
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no generation {job_id}", "job_id")
    stream_key = services.keys.events(job_id)
    if resume_after != "0" and await _ended(services, job_id):
        left = await services.async_redis.xread({stream_key: resume_after}, count=1)
        if not left:
            # Resumed after the last event: 204 is what tells an EventSource to stop
            # reconnecting (an empty 200 would have it come back every few seconds).
            return Response(status_code=204)

    async def read(after: str, block_ms: int | None) -> Any:
        return await services.blocking_redis.xread(
            {stream_key: after}, block=block_ms, count=100
        )

    async def events() -> AsyncGenerator[str, None]:
        after = resume_after
        block_ms = None  # the first read returns at once: a resumed stream may be past the end
        quiet_since = time.monotonic()
        # Shutting down ends the stream: the client's EventSource reconnects, with Last-Event-ID,
        # to a replica that stays (service.serving).
        while not services.draining and not await request.is_disconnected():
            try:
                first, reply = block_ms is None, await read(after, block_ms)
                block_ms = BLOCKING_READ_MS
                keepalive_due = (
                    time.monotonic() - quiet_since >= services.settings.sse_keepalive_s
                )
                # Whether it ended unseen (resumed after its terminal event; its record
                # expired): asked on the first read and with each keepalive, not every second.
                if not reply and (first or keepalive_due) and await _ended(services, job_id):
                    # The status and its event are written together, so this last read finds
                    # one written since.
                    reply = await read(after, None)
                    if not reply:
                        return
            # Only a lost or silent Redis is "unavailable"; any other error is a bug to surface.
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                code = ErrorCode.SERVER_BUSY if pool_exhausted(exc) else ErrorCode.REDIS_UNAVAILABLE
                yield f'event: error\ndata: {{"code": "{code.value}"}}\n\n'
                return
            if not reply:
                if keepalive_due:
                    quiet_since = time.monotonic()
                    yield ": keepalive\n\n"
                continue
            quiet_since = time.monotonic()
            for entry_id, event in decode_events(reply):
                after = entry_id
                yield f"id: {entry_id}\nevent: {event.type}\ndata: {event.model_dump_json()}\n\n"
                if event.status.is_terminal:
                    return

    _take_stream_slot(services, job_id)  # after the last await of this route: see EventStream
    return EventStream(events(), services)


def _take_stream_slot(services: ApiServices, job_id: str) -> None:
    """One of this process's event-stream slots, or a 503. Checked and taken with no await in
    between: a burst of streams (a drained replica's clients, all reconnecting here) cannot all
    pass the check before any of them counts."""
    if services.open_event_streams >= services.settings.max_event_streams:
        raise ApiError(
            503, ErrorCode.SERVER_BUSY,
            f"this API process holds its limit of {services.settings.max_event_streams} open "
            f"event streams; poll GET /v1/generations/{job_id} instead, or retry shortly",
            headers={"Retry-After": "5"},
        )
    services.open_event_streams += 1


class EventStream(StreamingResponse):
    """Server-sent events holding a stream slot, which it gives back however the response ends
    (finished, cut off by the client, cancelled by a shutdown)."""

    def __init__(self, events: AsyncGenerator[str, None], services: ApiServices) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.events = events
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.services.open_event_streams -= 1
            await self.events.aclose()


@router.get("/{job_id}/outputs/{index}", name="download_output", response_model=None)
# HEAD too (players probe length and range support with it), kept out of the schema: one
# operation per route there.
@router.head("/{job_id}/outputs/{index}", include_in_schema=False, response_model=None)
def download_output(
    job_id: str, index: int, services: Services, caller: Caller, request: Request
) -> Response:
    record = _load(services, job_id, caller)
    output = next((o for o in record.outputs if o.index == index), None)
    if output is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"generation {job_id} has no output {index}")
    url = services.storage.presigned_url(output.key, services.settings.presign_expiry_s)
    if url is not None:
        return RedirectResponse(url, status_code=307)
    etag = f'"{output.sha256}"'  # results never change: the content hash is the validator
    if _etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers={"ETag": etag})
    expired = ApiError(404, ErrorCode.NOT_FOUND, "the result has expired", None)
    media_type = CONTENT_TYPES[output.format]
    path = services.storage.local_path(output.key)
    if path is not None:
        # A file on this disk: Starlette answers Range requests (206), which browsers need to
        # seek in a clip and Safari needs to play one at all.
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise expired from None
        return OutputFileResponse(
            path, stat_result=stat, media_type=media_type, headers={"ETag": etag}
        )
    try:
        chunks = services.storage.open(output.key)
    except FileNotFoundError:
        raise expired from None
    headers = {"Content-Length": str(output.bytes), "ETag": etag}
    return StreamingResponse(chunks, media_type=media_type, headers=headers)


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def _resume_after(last_event_id: str | None) -> str:
    """The stream id to resume after: `Last-Event-ID` (an id this stream sent), else the start.

    Checked here, before streaming: Redis refuses a malformed id with an error that would
    otherwise reach the client as an `event: error` saying Redis is unavailable.
    """
    if not last_event_id:
        return "0"
    match = _STREAM_ID.fullmatch(last_event_id)
    if match is None or any(int(part) >= 2**64 for part in match.groups() if part):
        raise ApiError(
            422, ErrorCode.INVALID_REQUEST,
            "Last-Event-ID: must be an event id this stream sent (milliseconds-sequence)",
            "Last-Event-ID",
        )
    return last_event_id


def origin_of(
    request: Request, caller: Principal, body: GenerationCreate, user: str | None = None
) -> JobOrigin:
    """Who asked, and where and how the job reports back, from a body of this route's shape
    (the OpenAI route's too); its webhook refused (422) before any job exists. Blocking: the
    webhook's host is resolved (DNS)."""
    target = check_webhook_url(request, body.webhook) if body.webhook is not None else None
    return origin_for(
        request,
        caller,
        user=user,
        priority=body.priority,
        webhook=body.webhook,
        webhook_receiver=target.receiver if target is not None else None,
        webhook_events_filter=body.webhook_events_filter,
        metadata=body.metadata,
    )


def check_webhook_url(request: Request, url: str) -> WebhookTarget:
    policy: WebhookPolicy = request.app.state.webhook_policy
    if request.app.state.services.settings.webhook_secret is None:
        raise ApiError(
            422, ErrorCode.INVALID_REQUEST,
            "webhook: webhooks are disabled on this server (no signing secret configured)",
            "webhook",
        )
    try:
        return policy.resolve(url)
    except WebhookTargetRefused as exc:
        raise ApiError(422, ErrorCode.INVALID_REQUEST, f"webhook: {exc}", "webhook") from None


def _preferred_wait(prefer: str | None) -> int:
    """Seconds from `Prefer: wait=N` (RFC 7240), at most MAX_PREFER_WAIT_S. Anything else is
    ignored, as the RFC asks of a preference a server does not understand.

    The wait holds a wait slot (max_waiting_requests, each with a connection of the blocking
    Redis pool), not a thread. The cap keeps it inside the 60 s read timeout common to HTTP
    clients and reverse proxies (nginx's default), which would cut a longer wait off before its
    answer, and bounds how long one request keeps a slot that others then go without (they get
    their 202 at once)."""
    for part in (prefer or "").split(","):
        name, _, value = part.strip().partition("=")
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
        if name.strip().lower() == "wait" and _DECIMAL.fullmatch(value.strip()):
            return min(int(value), MAX_PREFER_WAIT_S)
    return 0


async def _waited(request: Request, services: ApiServices, job_id: str, wait_s: int) -> bool:
    """Whether the job ended within `wait_s`. With every wait slot taken, False at once: RFC 7240
    lets a server ignore a preference, and the client still gets its 202 to poll."""
    async with wait_slot(request) as granted:
        return granted and await wait_for_terminal(services, job_id, time.monotonic() + wait_s)


@asynccontextmanager
async def wait_slot(request: Request) -> AsyncIterator[bool]:
    """One of the app's slots for a request that waits on its jobs (max_waiting_requests):
    True while held; False, without queueing for one, when all are taken."""
    limiter: anyio.CapacityLimiter = request.app.state.wait_limiter
    try:
        limiter.acquire_nowait()
    except anyio.WouldBlock:
        yield False
        return
    try:
        yield True
    finally:
        limiter.release()


async def wait_for_terminal(
    services: ApiServices, job_id: str, deadline: float, *, end_on_drain: bool = True
) -> bool:
    """Whether the job reaches a terminal status before `deadline` (time.monotonic()), or, with
    `end_on_drain`, before this process starts shutting down.

    Reads its events on the asyncio Redis client: a waiting request holds no worker thread.
    """
    stream_key = services.keys.events(job_id)
    after = "0"
    while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
        # Short blocks, well inside the client's read timeout, however quiet the job.
        if end_on_drain and services.draining:
            return False  # shutting down: the request answers its 202, and the client polls
        try:
            reply = await services.blocking_redis.xread(
                {stream_key: after}, block=min(left_ms, BLOCKING_READ_MS), count=100
            )
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            # The job exists whatever Redis does now: wait out a blip instead of answering a
            # 503 that a client (OpenAI's retries 5xx itself) would retry into more jobs.
            await anyio.sleep(min(REDIS_RETRY_S, max(left_ms / 1000, 0)))
            continue
        for entry_id, event in decode_events(reply):
            after = entry_id
            if event.status.is_terminal:
                return True
    return False


async def redis_retried(call: Callable[[], T], within_s: float = REDIS_RETRY_WITHIN_S) -> T:
    """`call` (blocking, so in the thread pool), asked again while Redis is briefly away: for
    what a request still owes a job it made (its cancel, its final read), up to `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await run_in_threadpool(call)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            if time.monotonic() >= deadline:
                raise
            await anyio.sleep(REDIS_RETRY_S)


def _load(services: Services, job_id: str, caller: Principal) -> JobRecord:
    caller.require("read")
    record = services.store.get(job_id) if _JOB_ID.match(job_id) else None
    record = _visible(record, caller)
    if record is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no generation {job_id}", "job_id")
    return record


def _visible(record: JobRecord | None, caller: Principal) -> JobRecord | None:
    """Another key's job reads exactly like a missing one (404), never 403: ids stay secret."""
    if record is None or (caller.key_id is not None and record.origin.owner != caller.key_id):
        return None
    return record


async def _ended(services: Services, job_id: str) -> bool:
    """Whether the job has ended (or its record expired): its stream will grow no more."""
    status = await services.async_redis.hget(services.keys.job(job_id), "status")
    return status is None or JobStatus(as_text(status)).is_terminal


async def _owned_events(services: Services, job_id: str, caller: Principal) -> bool:
    if not await services.async_redis.exists(services.keys.events(job_id)):
        return False
    if caller.key_id is None:
        return True
    raw = await services.async_redis.hget(services.keys.job(job_id), "origin")
    return raw is not None and JobOrigin.model_validate_json(raw).owner == caller.key_id


async def _queue_position(services: ApiServices, record: JobRecord) -> int | None:
    """How many jobs a worker holding the job's model takes before it: its place in its own
    queue plus every job in the more urgent queues. None unless it is queued (or once it has
    left the queue)."""
    if record.status is not JobStatus.QUEUED:
        return None
    model, priority = record.params.model, record.origin.priority
    found = await services.async_redis.lpos(services.queue_for(model, priority).key, record.id)
    position = found if isinstance(found, int) else None
    if position is not None:
        for ahead in services.queues_ahead_of(model, priority):
            position += await services.async_redis.llen(ahead.key)
    return position


def _view(
    services: ApiServices, request: Request, record: JobRecord, position: int | None
) -> GenerationView:
    return generation_view(record, client_base_url(services.settings, request), position)
