"""Queued jobs of a model the service no longer serves fail with a clear error, not silence.

A job waits in its model's queue until a worker that holds the model takes it
(contract.queueing). Once a model is removed from the models file, no worker will: its queued
jobs would sit `queued` until their records expire, and `GET /v1/models` would not even name
the model. So every API process publishes the models its models file lists (a key with a short
TTL, refreshed here), and one process at a time fails the queued jobs of each model that no
live API process lists and no live worker holds, as `model_unavailable`.

Both conditions matter in a rollout. A model being added is listed by the new API before any
worker loads it (its jobs wait). A model being removed is still held by the old workers, which
drain its queue, and listed by old API replicas, which may still accept its jobs, until they stop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid

from redis.exceptions import RedisError
from rq.job import Job

from contract.jobs import ErrorCode, ErrorInfo, JobStatus
from contract.queueing import PRIORITIES, models_with_queues
from service.cancellation import end_queued
from service.live_workers import live_worker_models, presence_records
from service.services import ApiServices

log = logging.getLogger(__name__)


def publish_listed_models(services: ApiServices, process: str, ttl_s: float) -> None:
    """Say, for `ttl_s`, that the API process `process` accepts jobs for its models."""
    info = {"name": process, "pid": os.getpid(), "models": [m.name for m in services.models]}
    services.redis.set(services.keys.api(process), json.dumps(info), px=int(ttl_s * 1000))


def listed_models(services: ApiServices) -> set[str]:
    """The models some live API process accepts jobs for."""
    records = presence_records(services.redis, services.keys.api_pattern())
    return {model for _, info in records for model in info.get("models", [])}


def retired_models(services: ApiServices) -> set[str]:
    """Models with a queue that no live API process lists and no live worker holds."""
    served = listed_models(services)
    if not served:  # no API process said anything (all stopped?): no grounds to judge
        return set()
    for held in live_worker_models(services.redis, services.keys).values():
        served.update(held)
    return models_with_queues(services.redis, services.settings) - served


def fail_jobs_of_retired_models(services: ApiServices) -> int:
    """Fail every queued job of a retired model; the number failed."""
    failed_in_all = 0
    for model in sorted(retired_models(services)):
        error = ErrorInfo(
            code=ErrorCode.MODEL_UNAVAILABLE,
            message=f"model '{model}' is no longer served: it was removed from the service's "
            "models file while this job waited",
        )
        failed = 0
        for priority in PRIORITIES:
            queue = services.queue_for(model, priority)
            for job_id in queue.get_job_ids():
                record = services.store.get(job_id)
                if record is None:  # its record is gone: nothing to tell anyone
                    queue.remove(job_id)
                    services.redis.delete(Job.key_for(job_id))
                elif end_queued(services, record, JobStatus.FAILED, error):
                    failed += 1
        if failed:  # RQ keeps an emptied queue's name: a retired model comes back every pass
            log.warning("model %s is no longer served: failed %d queued jobs", model, failed)
        failed_in_all += failed
    return failed_in_all


class RetiredModelSweeper:
    """The API process's thread that publishes its models and, one process at a time, fails
    the queued jobs of retired models."""

    def __init__(self, services: ApiServices, settle_s: float | None = None) -> None:
        self.services = services
        self.interval_s = services.settings.retired_model_sweep_s
        # A published key outlives a missed pass or two, so a slow process is not taken for a
        # stopped one.
        self.ttl_s = 3 * self.interval_s
        # How long this process publishes without a Redis error before it judges anything: by
        # then every live API process has published again, also after an outage that let their
        # keys lapse (sweeping at once would fail the jobs of a model another replica serves).
        self.settle_s = self.ttl_s if settle_s is None else settle_s
        self.process = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._publishing_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="retired-models", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        # Gone now, not when the key expires: a replacement's sweep must not count on it.
        with contextlib.suppress(RedisError):
            self.services.redis.delete(self.services.keys.api(self.process))

    def _run(self) -> None:
        while True:
            try:
                self.pass_once()
            except RedisError as exc:  # the next pass retries; requests report the outage
                log.warning("retired-model sweep skipped, Redis unavailable: %s", exc)
            except Exception:
                log.exception("retired-model sweep failed; will retry")
            if self._stop.wait(self.interval_s):
                return

    def pass_once(self) -> int:
        try:
            publish_listed_models(self.services, self.process, ttl_s=self.ttl_s)
        except RedisError:
            self._publishing_since = None
            raise
        now = time.monotonic()
        if self._publishing_since is None:
            self._publishing_since = now
        if now - self._publishing_since < self.settle_s:
            return 0
        lock = self.services.keys.retired_model_sweep_lock()
        if not self.services.redis.set(lock, "1", nx=True, px=max(1, int(self.interval_s * 900))):
            return 0  # another API process swept within this interval
        return fail_jobs_of_retired_models(self.services)
