"""CORS for browser pages on other origins (SELFCASCADE_CORS_ORIGINS): what they may send and
read, and the middleware that says so."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from contract.settings import Settings

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
    "WWW-Authenticate",
)
# A preflight is cached per URL, and every job has URLs of its own, so a long cache saves little;
# 10 min covers following one job, and bounds how long a page whose origin was taken off the
# list can still send (never read) requests on a cached answer.
CORS_MAX_AGE_S = 600


def install_cors(app: FastAPI, settings: Settings) -> None:
    """The middleware, when origins are listed (none: no CORS headers, same-origin pages only).
    No credentials: keys travel in Authorization, not cookies."""
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=CORS_METHODS,
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_EXPOSED_HEADERS,
            max_age=CORS_MAX_AGE_S,
        )

