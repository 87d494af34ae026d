"""Health, readiness, metrics and the model catalogue."""

from __future__ import annotations

import redis.exceptions
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from contract.jobs import ErrorCode
from service.auth import Caller
from service.deps import Services
from service.errors import error_response
from service.live_workers import live_worker_models
from service.metrics import metrics_request_registry
from service.schemas import ModelView

router = APIRouter()


@router.get("/healthz", tags=["operations"])
def healthz() -> dict[str, str]:
    """The process is alive; says nothing about dependencies (that is /readyz)."""
    return {"status": "ok"}


@router.get("/readyz", tags=["operations"], response_model=None)
def readyz(services: Services) -> JSONResponse | dict[str, object]:
    try:
        services.redis.ping()
        workers = live_worker_models(services.redis, services.keys)
    except redis.exceptions.RedisError:
        return error_response(503, ErrorCode.REDIS_UNAVAILABLE, "Redis is unreachable")
    held = {m for models in workers.values() for m in models}
    missing = [m.name for m in services.models if m.name not in held]
    if missing:
        return error_response(
            503,
            ErrorCode.MODEL_UNAVAILABLE,
            f"no live worker holds model(s): {', '.join(missing)}",
            "model",
        )
    return {"status": "ready", "workers": len(workers)}


@router.get("/v1/models", tags=["models"])
def list_models(services: Services, caller: Caller) -> dict[str, list[ModelView]]:
    caller.require("read")
    workers = live_worker_models(services.redis, services.keys)
    views = [
        ModelView(
            name=m.name,
            native_width=m.native_width,
            native_height=m.native_height,
            size_multiple=m.size_multiple,
            tuned_available=m.upsamplers is not None,
            loaded_by_workers=sum(m.name in held for held in workers.values()),
        )
        for m in services.models
    ]
    return {"data": views}


@router.get("/metrics", tags=["operations"], include_in_schema=False)
def metrics(request: Request) -> Response:
    body = generate_latest(metrics_request_registry(request))
    return Response(body, media_type=CONTENT_TYPE_LATEST)
