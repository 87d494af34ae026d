"""The FastAPI app factory. Settings come in as an argument; nothing is read at import."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry

from contract.settings import Settings
from service.body_limit import BodySizeLimit
from service.cors import install_cors
from service.errors import UnexpectedErrors, install_error_handlers
from service.metrics import JobCollector, RequestMetrics
from service.playground import mount_playground
from service.production import install_production_api
from service.retired_models import RetiredModelSweeper
from service.routes import generations, operations
from service.services import ApiServices


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

    # FastAPIOffline: FastAPI with /docs and /redoc served from its own static files, not a CDN.
    app = FastAPIOffline(
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
    # The last added runs outermost: metrics wrap the body limit, so a 413 is still counted,
    # and everything wraps the routes' unexpected errors, so their 500 is an ordinary answer.
    app.add_middleware(UnexpectedErrors)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, registry=registry)
    # Around the body limit and the routes, so a 413, a 401 or a 429 carries its
    # Access-Control-Allow-Origin and the page can read why; around the metrics, which count API
    # requests, not preflights; inside RequestContext, so a preflight is logged with an id.
    install_cors(app, settings)
    # API keys, admission limits, webhook policy, OpenAI route, request ids (issue 6).
    install_production_api(app, services)
    return app
