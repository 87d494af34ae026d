"""Turning accepted parameters into queued jobs, shared by the native and OpenAI-style routes.

Order matters: checks that cost nothing come first (queue depth, then the rate-limit tokens),
records are created before their active slots are reserved (the slot script drops ids whose
record does not exist), and a job is enqueued only once everything else has succeeded.
"""

from __future__ import annotations

import time
import uuid

import redis.exceptions
from starlette.requests import Request

from contract.jobs import GenerationParams, JobOrigin, JobRecord, JobStatus, WebhookEvent
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
    webhook_events_filter: list[WebhookEvent] | None = None,
    user: str | None = None,
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
            webhook_events_filter=sorted(set(webhook_events_filter or ["completed"])),
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
    admission.check_queue_depth()
    admission.take_rate_tokens(caller.bucket, cost=len(params))
    now = time.time()
    records = [services.store.create(i, p, now, origin) for i, p in zip(ids, params, strict=True)]
    try:
        admission.reserve_active_slots(caller.bucket, ids)
    except Exception:
        for job_id in ids:
            services.store.discard(job_id)
        raise
    queue = services.queues[origin.priority]
    for job_id in ids:
        try:
            enqueue_generation(queue, job_id, services.settings)
        except redis.exceptions.RedisError:
            # Never leave a record that no worker will ever pick up.
            services.store.transition(job_id, [JobStatus.QUEUED], JobStatus.FAILED, None)
            raise
    return records
