"""The FastAPI app factory. Settings come in as an argument; nothing is read at import."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.middleware.cors import CORSMiddleware

from contract.settings import Settings
from service.body_limit import BodySizeLimit
from service.errors import install_error_handlers
from service.metrics import JobCollector, RequestMetrics
from service.playground import mount_playground
from service.production import install_production_api
from service.retired_models import RetiredModelSweeper
from service.routes import generations, operations
from service.services import ApiServices

# What a page on another origin (SELFCASCADE_CORS_ORIGINS) needs: the methods the routes take,
# the request headers the API reads, and the response headers it sets that a script may read
# only when exposed (the CORS-safelisted ones, Content-Type and Content-Length, always are).
CORS_METHODS = ("GET", "HEAD", "POST")
CORS_REQUEST_HEADERS = (
    "Authorization", "Content-Type", "Idempotency-Key", "Prefer", "X-Request-ID", "traceparent",
    "Last-Event-ID", "Range", "If-Range", "If-None-Match",
)
CORS_EXPOSED_HEADERS = (
    "Location", "Retry-After", "X-Request-ID", "Preference-Applied", "ETag", "Content-Range",
)
# A preflight is cached per URL, and every job has URLs of its own, so a long cache saves little;
# 10 min covers following one job, and bounds how long a page whose origin was taken off the
# list can still send (never read) requests on a cached answer.
CORS_MAX_AGE_S = 600


def create_app(settings: Settings) -> FastAPI:
    services = ApiServices.build(settings)

    sweeper = RetiredModelSweeper(services)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        sweeper.start()
        yield
        sweeper.stop()
        await services.async_redis.aclose()
        await services.blocking_redis.aclose()
        services.redis.close()

    app = FastAPI(
        title="selfcascade",
        version="0.1.0",
        summary="Higher-resolution image generation with self-cascade diffusion",
        lifespan=lifespan,
    )
    app.state.services = services
    registry = CollectorRegistry()
    registry.register(JobCollector(services))
    app.state.metrics_registry = registry
    # Requests that wait on their jobs take a slot here, never a thread of the shared pool:
    # waits there once starved every sync route, /healthz included (service.routes.generations).
    app.state.wait_limiter = anyio.CapacityLimiter(settings.max_waiting_requests)

    install_error_handlers(app)
    app.include_router(generations.router)
    app.include_router(operations.router)
    mount_playground(app)  # the web page at /, static files under /static
    # The last added runs outermost: metrics wrap the body limit, so a 413 is still counted.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, registry=registry)
    if settings.cors_origins:
        # Around the body limit and the routes, so a 413, a 401 or a 429 carries its
        # Access-Control-Allow-Origin and the page can read why; around the metrics, which count
        # API requests, not preflights; inside RequestContext, so a preflight is logged with an
        # X-Request-ID. A 500 is answered outside every middleware (service.errors), without
        # CORS headers. No credentials: keys travel in Authorization, not cookies.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=CORS_METHODS,
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_EXPOSED_HEADERS,
            max_age=CORS_MAX_AGE_S,
        )
    # API keys, admission limits, webhook policy, OpenAI route, request ids (issue 6).
    install_production_api(app, services)
    return app
