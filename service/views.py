"""The public representation of a generation: what GET returns and what webhooks send."""

from __future__ import annotations

from contract.jobs import JobRecord, JobStatus
from service.schemas import GenerationView, OutputView


def generation_view(record: JobRecord, base_url: str, position: int | None) -> GenerationView:
    """`base_url` is the API's address as the client sees it (no trailing slash)."""
    outputs = [
        OutputView(
            url=f"{base_url}/v1/generations/{record.id}/outputs/{o.index}",
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
    )
