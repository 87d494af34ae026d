"""The webhook sender (`python -m service.webhook_worker`) through a Redis outage: a few lines
in its log, not a traceback five times a second, and deliveries again once Redis is back.

Uses a redis-server of its own (stopped and started again), never the shared one.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.exceptions
from redis import Redis

import service.webhook_worker
from contract.keys import RedisKeys
from contract.webhook_queue import WebhookDelivery, schedule
from service.webhook_worker import WebhookDispatcher
from tests.live_stack import REPO, settings_env, wait_for
from tests.service.conftest import OwnRedis
from tests.service.test_webhook_delivery import delivery, receiver, settings

pytestmark = pytest.mark.integration

OUTAGE_S = 4.0


class SenderProcess:
    """`python -m service.webhook_worker` as a child process, its log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.webhook_worker", "--log-level", "info"],
                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        return self.process.returncode


def queue(redis_url: str, prefix: str, entry: WebhookDelivery) -> None:
    with Redis.from_url(redis_url, socket_timeout=5) as client:
        schedule(client, RedisKeys(prefix), entry, time.time() - 1)


def all_finished(redis_url: str, prefix: str) -> bool:
    """No claim left in flight: each send is over, logged and its claim removed."""
    with Redis.from_url(redis_url, socket_timeout=5) as client:
        return client.zcard(RedisKeys(prefix).webhooks_in_flight()) == 0


def test_a_redis_outage_is_a_few_log_lines_and_delivery_resumes_after_it(
    own_redis: OwnRedis, key_prefix: str, tmp_path: Path
) -> None:
    config = settings(own_redis.url, key_prefix)
    with receiver(204) as (url, hooks):
        sender = SenderProcess(settings_env(config), tmp_path / "webhooks.log")
        try:
            # Running and claiming: a delivery queued before the outage arrives.
            queue(own_redis.url, key_prefix, delivery(url).model_copy(update={"id": "before"}))
            wait_for(lambda: len(hooks) == 1, 20, "the delivery before the outage")
            wait_for(lambda: all_finished(own_redis.url, key_prefix), 10, "its claim to end")
            before = len(sender.log().splitlines())

            own_redis.stop()
            time.sleep(OUTAGE_S)
            during = sender.log().splitlines()[before:]
            own_redis.start()  # empty (no persistence), on the same port
            queue(own_redis.url, key_prefix, delivery(url).model_copy(update={"id": "after"}))
            wait_for(lambda: len(hooks) == 2, 20, "the delivery queued after the outage")
            outage = sender.log().splitlines()[before:]
        finally:
            code = sender.stop()
    assert [hook.headers["webhook-id"] for hook in hooks] == ["before", "after"]
    # One warning when Redis went away, one line when it answered again; no tracebacks. (The
    # old loop logged a traceback of some thirty lines every 0.2 s.)
    assert len(during) == 1, "\n".join(during[:40])
    assert "Traceback" not in "\n".join(outage)
    # Its own lines (run with -m, the module logs as __main__), not httpx's or a delivery's.
    [away, back] = [line for line in outage if " __main__ " in line]
    assert away == during[0]
    assert " WARNING " in away and "retry" in away, away
    assert "Redis" in back and "again" in back, back
    assert code == 0, sender.log()  # SIGTERM still ends it cleanly


def test_a_claim_that_keeps_crashing_is_logged_with_its_traceback_but_backed_off(
    own_redis: OwnRedis, key_prefix: str, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug (not Redis) is still logged in full, but no longer five times a second."""

    def broken(*args: object, **kwargs: object) -> list[object]:
        raise RuntimeError("a bug in claiming")

    monkeypatch.setattr(service.webhook_worker, "claim_due", broken)
    dispatcher = WebhookDispatcher(settings(own_redis.url, key_prefix), threads=1)
    with caplog.at_level(logging.INFO, logger=service.webhook_worker.__name__):
        thread = dispatcher.start_thread()
        time.sleep(2.0)
        dispatcher.stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    crashes = [r for r in caplog.records if r.levelno == logging.ERROR]
    # Pauses of 0.2, 0.4, 0.8, ... s: four tries in two seconds at most (ten before).
    assert 2 <= len(crashes) <= 4, [r.getMessage() for r in crashes]
    assert all(r.exc_info and r.exc_info[0] is RuntimeError for r in crashes)


def test_busy_threads_during_an_outage_are_not_taken_for_redis_answering(
    own_redis: OwnRedis, key_prefix: str, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A loop that found every thread busy never asked Redis: it once logged "Redis answers
    again" mid-outage and dropped its pause back to the shortest."""

    def away(*args: object, **kwargs: object) -> list[object]:
        raise redis.exceptions.ConnectionError("Connection refused")

    monkeypatch.setattr(service.webhook_worker, "claim_due", away)
    dispatcher = WebhookDispatcher(settings(own_redis.url, key_prefix), threads=1)
    with caplog.at_level(logging.INFO, logger=service.webhook_worker.__name__):
        thread = dispatcher.start_thread()
        time.sleep(0.5)  # away, and said so once
        dispatcher._free.acquire()  # the one thread busy with a send, as long as the outage
        time.sleep(2.5)
        dispatcher._free.release()
        time.sleep(0.5)
        dispatcher.stop.set()
        thread.join(timeout=10)
    lines = [r.getMessage() for r in caplog.records]
    assert not [line for line in lines if "answers again" in line], lines
    assert len([line for line in lines if "unreachable" in line]) == 1, lines
