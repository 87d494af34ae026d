"""Redis clients with short timeouts: a dead Redis must surface as an error, never a hang."""

from __future__ import annotations

from redis import Redis


def connect(url: str, *, socket_timeout: float = 5.0) -> Redis:
    return Redis.from_url(
        url,
        socket_connect_timeout=2.0,
        socket_timeout=socket_timeout,
        health_check_interval=10,
    )
