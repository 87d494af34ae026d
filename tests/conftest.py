"""Shared fixtures for integration tests: a real Redis, free ports, and process helpers.

Tests use the Redis at 127.0.0.1:6379 (or SELFCASCADE_TEST_REDIS_URL), in a database of its
own (default 11) that is flushed before and after the session; each test also gets a unique
key prefix, so its queue and job keys never meet another test's. A session holds the database
while it runs: a second session on the same one stops at once, saying so, instead of flushing
the first one's keys from under it (jobs then vanish mid-test, as 404s no one can explain).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
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


# The session's claim on the database: renewed while it runs, so a killed session's claim
# lapses within SESSION_CLAIM_S and the next session may start.
SESSION_CLAIM_KEY = "selfcascade-tests:session"
SESSION_CLAIM_S = 60


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    client = Redis.from_url(TEST_REDIS_URL, socket_timeout=2)
    try:
        client.ping()
    except Exception as exc:  # pragma: no cover - environment problem, not a test failure
        pytest.skip(f"no Redis at {TEST_REDIS_URL}: {exc}")
    me = f"{socket.gethostname()} pid {os.getpid()}"
    holder = client.get(SESSION_CLAIM_KEY)
    if holder is not None:
        pytest.exit(
            f"another test session ({holder.decode()}) is using {TEST_REDIS_URL}; wait for it, "
            "or set SELFCASCADE_TEST_REDIS_URL to another database",
            returncode=3,
        )
    client.flushdb()
    client.set(SESSION_CLAIM_KEY, me, ex=SESSION_CLAIM_S)
    done = threading.Event()

    def renew() -> None:
        while not done.wait(SESSION_CLAIM_S / 3):
            with contextlib.suppress(Exception):  # a test stopping Redis must not end this
                client.set(SESSION_CLAIM_KEY, me, ex=SESSION_CLAIM_S)

    renewer = threading.Thread(target=renew, name="test-session-claim", daemon=True)
    renewer.start()
    try:
        yield TEST_REDIS_URL
    finally:
        done.set()
        renewer.join(timeout=5)
        client.flushdb()  # the claim with the rest
        client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Redis]:
    client = Redis.from_url(redis_url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def key_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"
