"""Health, readiness, metrics and the model catalogue."""

from __future__ import annotations

from typing import Annotated

import redis.exceptions
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from contract.jobs import IMAGE_FORMATS, VIDEO_FORMATS, ErrorCode
from contract.settings import ModelSpec
from service.auth import Caller
from service.deps import Services
from service.errors import error_response
from service.live_workers import live_worker_models
from service.metrics import metrics_request_registry
from service.schemas import ModelView
from service.worker_demand import worker_demand

router = APIRouter()


@router.get("/healthz", tags=["operations"])
async def healthz() -> dict[str, str]:
    """The process is alive; says nothing about dependencies (that is /readyz)."""
    # Async with no I/O, so it never queues for a worker thread: a liveness probe that timed
    # out behind busy sync routes would have the pod restarted for being merely busy.
    return {"status": "ok"}


@router.get("/readyz", tags=["operations"], response_model=None)
def readyz(
    services: Services,
    model: Annotated[
        list[str] | None, Query(description="a model a live worker must hold (repeatable)")
    ] = None,
) -> JSONResponse | dict[str, object]:
    """Ready: Redis answers and a live worker holds a model; given `model`, each of those.
    Workers split across models (SELFCASCADE_WORKER_MODELS) are ready with any of them: a job
    for a model no worker holds waits, queued, for one."""
    known = [m.name for m in services.models]
    refused = _unknown_models(known, model or [])
    if refused:
        return refused
    try:
        services.redis.ping()
        workers = live_worker_models(services.redis, services.keys)
    except redis.exceptions.RedisError:
        return error_response(503, ErrorCode.REDIS_UNAVAILABLE, "Redis is unreachable")
    holding = {name: sum(name in held for held in workers.values()) for name in known}
    required = list(dict.fromkeys(model or []))
    missing = [name for name in required if not holding[name]]
    if not required and not any(holding.values()):
        missing = known
    if missing:
        return error_response(
            503,
            ErrorCode.MODEL_UNAVAILABLE,
            f"no live worker holds model(s): {', '.join(missing)}",
            "model",
        )
    return {"status": "ready", "workers": len(workers), "models": holding}


@router.get("/autoscaling/demand", tags=["operations"], response_model=None)
def autoscaling_demand(
    services: Services,
    model: Annotated[list[str] | None, Query(description="a model the worker pool holds")] = None,
) -> JSONResponse | dict[str, object]:
    """The jobs a worker pool has in flight, for KEDA's metrics-api trigger (`in_flight`):
    waiting in, or running from, every queue a worker holding `model` (repeatable; default
    every model in the models file) listens to."""
    known = [m.name for m in services.models]
    models = list(dict.fromkeys(model or known))  # a name given twice counts once
    refused = _unknown_models(known, models)
    if refused:
        return refused
    demand = worker_demand(services, models)  # Redis down: the app's 503, Retry-After and all
    return {
        "models": demand.models,
        "waiting": demand.waiting,
        "running": demand.running,
        "in_flight": demand.in_flight,
    }


def _unknown_models(known: list[str], asked: list[str]) -> JSONResponse | None:
    """A 422 naming the models asked about that the models file does not list, if any."""
    unknown = [name for name in asked if name not in known]
    if not unknown:
        return None
    return error_response(
        422,
        ErrorCode.INVALID_REQUEST,
        f"unknown model(s): {', '.join(unknown)}; the models file names: {', '.join(known)}",
        "model",
    )


@router.get("/v1/models", tags=["models"])
def list_models(services: Services, caller: Caller) -> dict[str, list[ModelView]]:
    caller.require("read")
    workers = live_worker_models(services.redis, services.keys)
    views = [
        _model_view(m, sum(m.name in held for held in workers.values())) for m in services.models
    ]
    return {"data": views}


def _model_view(spec: ModelSpec, loaded_by_workers: int) -> ModelView:
    video = spec.produces_video
    return ModelView(
        name=spec.name,
        native_width=spec.native_width,
        native_height=spec.native_height,
        size_multiple=spec.size_multiple,
        tuned_available=bool(spec.upsamplers),
        default_pivot_strength=spec.default_pivot_strength,
        loaded_by_workers=loaded_by_workers,
        produces="video" if video else "image",
        output_formats=list(VIDEO_FORMATS if video else IMAGE_FORMATS),
        default_num_frames=spec.default_num_frames if video else None,
        max_num_frames=spec.max_num_frames if video else None,
        default_fps=spec.default_fps if video else None,
    )


@router.get("/metrics", tags=["operations"], include_in_schema=False)
def metrics(request: Request) -> Response:
    body = generate_latest(metrics_request_registry(request))
    return Response(body, media_type=CONTENT_TYPE_LATEST)
