"""The public representation of a generation: what GET returns and what webhooks send."""

from __future__ import annotations

from fastapi import Request

from contract.jobs import JobRecord, JobStatus
from contract.settings import Settings
from service.schemas import GenerationView, OutputView


def client_base_url(settings: Settings, request: Request) -> str:
    """The API's address as clients reach it, for the URLs in response bodies.

    SELFCASCADE_PUBLIC_BASE_URL when set: behind a TLS ingress the request arrives as plain
    http from the proxy, so the request's own base URL would hand clients http:// links (and a
    client following one would send its API key in clear text). Without it, the request's.
    """
    return (settings.public_base_url or str(request.base_url)).rstrip("/")


def job_url(base_url: str, job_id: str) -> str:
    """Where a client reads a job (GET /v1/generations/{id}): the Location of its creation."""
    return f"{base_url}/v1/generations/{job_id}"


def output_url(base_url: str, job_id: str, index: int) -> str:
    """Where a client downloads a job's output `index` (GET /v1/generations/{id}/outputs/{n})."""
    return f"{job_url(base_url, job_id)}/outputs/{index}"


def generation_view(record: JobRecord, base_url: str, position: int | None) -> GenerationView:
    """`base_url` is the API's address as the client sees it (no trailing slash)."""
    outputs = [
        OutputView(
            url=output_url(base_url, record.id, o.index),
            width=o.width,
            height=o.height,
            format=o.format,
            bytes=o.bytes,
            sha256=o.sha256,
            role=o.role,
            frames=o.frames,
            fps=o.fps,
            duration_s=round(o.frames / o.fps, 3) if o.frames and o.fps else None,
        )
        for o in record.outputs
    ]
    return GenerationView(
        id=record.id,
        status=record.status,
        model=record.params.model,
        params=record.params,
        progress=record.progress,
        queue_position=position if record.status is JobStatus.QUEUED else None,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        attempts=record.attempts,
        outputs=outputs,
        error=record.error,
        metrics=record.metrics,
        priority=record.origin.priority,
        webhook=record.origin.webhook,
        webhook_events_filter=record.origin.webhook_events_filter if record.origin.webhook else [],
        metadata=record.origin.metadata,
    )
