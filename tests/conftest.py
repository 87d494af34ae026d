"""Shared fixtures for integration tests: a real Redis, free ports, and process helpers.

Tests use the Redis at 127.0.0.1:6379 (or SELFCASCADE_TEST_REDIS_URL), in a database of its
own (default 11) that is flushed before and after the session; each test also gets a unique
key prefix, so its queue and job keys never meet another test's.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest
from redis import Redis

# Tests (and the processes they start) run the tiny random model: fast, and independent of the
# shipped demo weights, which have tests of their own.
os.environ["SELFCASCADE_DEMO_MODEL_DIR"] = "/nonexistent/selfcascade-demo"

TEST_REDIS_URL = os.environ.get("SELFCASCADE_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    client = Redis.from_url(TEST_REDIS_URL, socket_timeout=2)
    try:
        client.ping()
    except Exception as exc:  # pragma: no cover - environment problem, not a test failure
        pytest.skip(f"no Redis at {TEST_REDIS_URL}: {exc}")
    client.flushdb()
    yield TEST_REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Redis]:
    client = Redis.from_url(redis_url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def key_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"
