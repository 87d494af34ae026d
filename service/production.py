"""The production layer on top of the core API, installed by create_app in one call: API keys,
admission limits, the webhook policy, the OpenAI-compatible route and request ids/tracing."""

from __future__ import annotations

from fastapi import FastAPI

from service.admission import Admission
from service.auth import Keyring
from service.request_context import RequestContext
from service.routes import openai_images
from service.services import ApiServices
from service.webhook_targets import WebhookPolicy


def install_production_api(app: FastAPI, services: ApiServices) -> None:
    app.state.keyring = Keyring.from_settings(services.settings)
    app.state.admission = Admission(services)
    app.state.webhook_policy = WebhookPolicy.from_settings(services.settings)
    app.include_router(openai_images.router)
    # Added last, so outermost: even a 413 or a 401 carries its X-Request-ID.
    app.add_middleware(RequestContext)
