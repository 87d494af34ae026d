"""Redis clients with short timeouts: a dead Redis must surface as an error, never a hang."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import redis.exceptions
from redis import Redis

T = TypeVar("T")
RETRY_PAUSE_S = 0.5


def connect(url: str, *, socket_timeout: float = 5.0) -> Redis:
    return Redis.from_url(
        url,
        socket_connect_timeout=2.0,
        socket_timeout=socket_timeout,
        health_check_interval=10,
    )


def retry_while_away(call: Callable[[], T], within_s: float) -> T:
    """`call()`, asked again every RETRY_PAUSE_S while Redis is unreachable (a lost connection
    or a timeout), for up to `within_s`; then its error. Only for calls safe to repeat."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return call()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(RETRY_PAUSE_S)
