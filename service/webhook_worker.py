"""`selfcascade-webhooks`: the process that sends webhooks, away from the GPU workers.

Claims due deliveries from Redis (contract.webhook_queue) and sends them from a small thread
pool, so one slow receiver never holds up the others for long: each send ends by a hard
deadline (webhook_timeout_s), and its claim is made to outlive that deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from types import FrameType

import redis.exceptions

from contract.keys import RedisKeys
from contract.log_format import configure_logging
from contract.redis_connection import connect
from contract.settings import Settings, settings_from_env
from contract.webhook_queue import Claimed, claim_due, claim_lifetime_s, finish_claim
from service.webhook_delivery import WebhookSender

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.2
# The pause after a failed claim doubles from POLL_INTERVAL_S up to this: a Redis outage (or a
# bug met on every claim) must not log and retry five times a second, and Redis coming back is
# still noticed within seconds.
MAX_FAILURE_PAUSE_S = 5.0
# Redis away (stopped, restarting, network down), not a bug: worth a warning, not a traceback.
REDIS_AWAY = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class ClaimFailures:
    """Claims failed in a row: how long to pause before the next one, and one log line for the
    start of a Redis outage and one for its end, as the worker and the API log an outage's
    events once, not once per try."""

    def __init__(self) -> None:
        self.in_a_row = 0
        self.redis_away_since: float | None = None  # monotonic; None while Redis answers

    def pause_s(self) -> float:
        """POLL_INTERVAL_S after a claim, and after a first failure; then 2x, 4x, ... capped."""
        return min(POLL_INTERVAL_S * 2 ** max(self.in_a_row - 1, 0), MAX_FAILURE_PAUSE_S)

    def redis_away(self, error: Exception) -> None:
        self.in_a_row += 1
        if self.redis_away_since is None:
            self.redis_away_since = time.monotonic()
            log.warning(
                "Redis is unreachable (%s); webhooks wait for it, claiming keeps retrying "
                "(every %g s at most)", error, MAX_FAILURE_PAUSE_S,
            )

    def crashed(self) -> None:
        self.in_a_row += 1

    def claimed(self) -> None:
        if self.redis_away_since is not None:
            away_s = time.monotonic() - self.redis_away_since
            log.info("Redis answers again after %.1f s away; claiming webhooks again", away_s)
            self.redis_away_since = None
        self.in_a_row = 0


class WebhookDispatcher:
    def __init__(self, settings: Settings, threads: int = 4) -> None:
        if not settings.redis_url:
            raise ValueError("SELFCASCADE_REDIS_URL (or REDIS_URL) must be set")
        self.settings = settings
        self.redis = connect(settings.redis_url)
        self.keys = RedisKeys(settings.redis_prefix)
        self.threads = threads
        self.stop = threading.Event()
        self._free = threading.Semaphore(threads)

    def run(self) -> None:
        if self.settings.webhook_secret is None:
            log.warning("no SELFCASCADE_WEBHOOK_SECRET: webhooks are disabled, nothing to send")
            self.stop.wait()
            return
        # The pool is left (and waits for its sends) before the sender's client closes.
        with (
            closing(WebhookSender(self.settings, self.redis)) as sender,
            ThreadPoolExecutor(self.threads, thread_name_prefix="webhook") as pool,
        ):
            log.info("webhook delivery running (%d threads)", self.threads)
            failures = ClaimFailures()
            while not self.stop.is_set():
                claimed: list[Claimed] = []
                deadline = 0.0
                try:
                    asked = self._claim()
                except REDIS_AWAY as exc:
                    failures.redis_away(exc)
                except Exception:
                    # A bug: logged in full every time, but backed off like an outage.
                    log.exception("claiming webhooks failed; will retry")
                    failures.crashed()
                else:
                    if asked is not None:  # None: every thread busy, Redis not asked at all
                        claimed, deadline = asked
                        failures.claimed()
                for entry in claimed:
                    pool.submit(self._send, sender, entry, deadline)
                if not claimed:
                    self.stop.wait(failures.pause_s())

    def _claim(self) -> tuple[list[Claimed], float] | None:
        """Due entries, one per free thread, and the deadline (monotonic) their sends end by;
        None when every thread is busy (Redis was not asked: its answer says nothing of it)."""
        if not self._free.acquire(timeout=1):
            return None
        available = 1
        while available < self.threads and self._free.acquire(blocking=False):
            available += 1
        # The deadline starts before the claim and the claim lasts longer than the deadline, so
        # a send cannot outlive its claim and be sent a second time by another thread.
        timeout_s = self.settings.webhook_timeout_s
        deadline = time.monotonic() + timeout_s
        claimed: list[Claimed] = []
        try:
            claimed = claim_due(
                self.redis, self.keys, time.time(), available, claim_lifetime_s(timeout_s),
                per_receiver=self.settings.webhook_receiver_concurrency,
            )
        finally:
            # Permits not used by a claim go back, also when Redis failed: a leak would stall
            # delivery for good while the process looks healthy.
            for _ in range(available - len(claimed)):
                self._free.release()
        return claimed, deadline

    def _send(self, sender: WebhookSender, claimed: Claimed, deadline: float) -> None:
        try:
            sender.deliver(claimed.delivery, deadline)
            finish_claim(self.redis, self.keys, claimed)
        except REDIS_AWAY as exc:
            # Left in flight on purpose: the claim lapses and the entry is tried again. An outage
            # is the claim loop's one warning; no traceback per send caught in it.
            log.warning(
                "webhook for generation %s: Redis away (%s); it is tried again once its claim "
                "lapses", claimed.delivery.job_id, exc,
            )
        except redis.exceptions.RedisError:
            log.exception("webhook for generation %s: Redis failed", claimed.delivery.job_id)
        except Exception as exc:
            # A bug met by this delivery: counted as a failed attempt, so it ends among the dead
            # letters after the usual attempts instead of coming back every claim for ever.
            log.exception("webhook for generation %s crashed", claimed.delivery.job_id)
            with contextlib.suppress(redis.exceptions.RedisError):
                sender.retry_or_fail(claimed.delivery, f"sender error: {type(exc).__name__}")
                finish_claim(self.redis, self.keys, claimed)
        finally:
            self._free.release()

    def start_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="webhooks", daemon=True)
        thread.start()
        return thread


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="selfcascade webhook delivery")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    settings = settings_from_env()
    configure_logging(settings.log_format, args.log_level)
    dispatcher = WebhookDispatcher(settings, args.threads)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        dispatcher.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    dispatcher.run()


if __name__ == "__main__":
    main()
