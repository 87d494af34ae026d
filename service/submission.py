"""Turning accepted parameters into queued jobs, shared by the native and OpenAI-style routes.

Order matters: checks that cost nothing come first (queue depth, then the rate-limit tokens),
then the key's active slots are reserved, and last the records are created and enqueued in one
MULTI/EXEC transaction: a job is either recorded and queued or not there at all, whatever
happens to Redis or this process in between (no `queued` record that no worker will run).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import Counter

import redis.exceptions
from starlette.requests import Request

from contract.jobs import GenerationParams, JobOrigin, JobRecord, WebhookEvent
from contract.queueing import enqueue_generation
from contract.trace_context import accept_request_id, accept_traceparent
from service.admission import Admission
from service.auth import Principal
from service.services import ApiServices


def origin_for(
    request: Request,
    caller: Principal,
    *,
    priority: str = "interactive",
    webhook: str | None = None,
    webhook_receiver: str | None = None,
    webhook_events_filter: list[WebhookEvent] | None = None,
    user: str | None = None,
    metadata: dict[str, str] | None = None,
) -> JobOrigin:
    state = request.scope.get("state", {})
    return JobOrigin.model_validate(
        dict(
            owner=caller.key_id,
            user=user,
            priority=priority,
            request_id=state.get("request_id") or accept_request_id(None),
            traceparent=state.get("traceparent") or accept_traceparent(None),
            webhook=webhook,
            webhook_receiver=webhook_receiver,
            webhook_events_filter=sorted(set(webhook_events_filter or ["completed"])),
            metadata=metadata or {},
        )
    )


def submit(
    services: ApiServices,
    admission: Admission,
    caller: Principal,
    params: list[GenerationParams],
    origin: JobOrigin,
    job_ids: list[str] | None = None,
) -> list[JobRecord]:
    """Create and enqueue one job per params entry; 429 (nothing created) when refused."""
    ids = job_ids or [uuid.uuid4().hex for _ in params]
    admission.refuse_what_never_fits(len(params))  # before any tokens are taken for it
    for model, count in Counter(p.model for p in params).items():
        admission.check_queue_depth(model, adding=count)
    admission.take_rate_tokens(caller.bucket, cost=len(params))
    now = time.time()
    # Slots first: the slot script drops ids whose record does not exist yet only when another
    # request of the same key runs in the instant before our transaction (then the key may
    # briefly exceed its cap by these jobs; nothing is lost).
    admission.reserve_active_slots(caller.bucket, ids)
    try:
        with services.redis.pipeline(transaction=True) as transaction:
            transaction.multi()  # explicit, as RQ expects of a pipeline it is handed
            records = [
                services.store.create(job_id, p, now, origin, pipeline=transaction)
                for job_id, p in zip(ids, params, strict=True)
            ]
            for job_id, p in zip(ids, params, strict=True):
                queue = services.queue_for(p.model, origin.priority)
                enqueue_generation(queue, job_id, services.settings, pipeline=transaction)
            transaction.execute()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        # The connection broke around EXEC: Redis may have run the transaction all the same.
        # After a timeout it may yet run it (still queued on a busy server): not asked then.
        timed_out = isinstance(exc, redis.exceptions.TimeoutError)
        committed = None if timed_out else _committed(services, ids[0])
        if committed:
            return records
        if committed is None:
            raise OutcomeUnknown(str(exc)) from exc  # slots kept: see _release_quietly
        _release_quietly(admission, caller.bucket, ids)
        raise
    except BaseException:
        _release_quietly(admission, caller.bucket, ids)
        raise
    return records


class OutcomeUnknown(redis.exceptions.ConnectionError):
    """Redis went away during the create transaction and did not come back to say whether it
    ran: callers keep what they reserved for it (an Idempotency-Key claim) rather than free it
    for a retry that could make a second job. Answered like any lost Redis: 503."""


def _committed(services: ApiServices, job_id: str) -> bool | None:
    """Whether the create transaction ran (it is all or nothing, so one record tells); None
    when Redis still does not answer."""
    try:
        return bool(services.redis.exists(services.keys.job(job_id)))
    except redis.exceptions.RedisError:
        return None


def _release_quietly(admission: Admission, bucket: str, ids: list[str]) -> None:
    """Give back the slots of jobs that were never created (best effort: with Redis down the
    next reservation drops them anyway, since their records do not exist)."""
    with contextlib.suppress(redis.exceptions.RedisError):
        admission.release_active_slots(bucket, ids)
