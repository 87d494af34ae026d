"""The worker process: an RQ SimpleWorker that keeps models resident and leases its jobs.

SimpleWorker runs each job in this process: no fork, so a CUDA context and the loaded models
survive from one job to the next. Because nothing monitors a SimpleWorker's job from outside,
a lease thread renews the job's StartedJobRegistry entry every few seconds; when the process
dies the lease lapses, and any worker's reaper hands the job back to RQ (worker.abandoned).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from redis import Redis
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from contract.exit_codes import EXIT_WEDGED
from contract.jobs import Priority
from contract.keys import RedisKeys
from contract.queueing import PRIORITIES, generation_queues, models_with_queues, queue_name
from worker.abandoned import make_exception_handler
from worker.gpu_memory import gpu_memory_in_use
from worker.job import NOT_THIS_RUNS
from worker.lost_jobs import PASS_INTERVAL_S as LOST_JOBS_PASS_INTERVAL_S
from worker.lost_jobs import recover_lost_jobs
from worker.resident import WorkerRuntime

log = logging.getLogger(__name__)

RESULT_SWEEP_INTERVAL_S = 3600.0


class GenerationWorker(SimpleWorker):
    """A SimpleWorker with short job leases, a presence key for /readyz, and a reaper thread."""

    def __init__(
        self,
        queues: list[Queue],
        *,
        runtime: WorkerRuntime,
        on_stall: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        self.runtime = runtime
        # What a wedged job does to this process; tests observe it instead of exiting.
        self.on_stall = on_stall or _exit_for_restart
        self._priority_by_queue: dict[str, Priority] = {
            queue_name(runtime.settings, model, priority): priority
            for model in runtime.models
            for priority in PRIORITIES
        }
        self.keys = RedisKeys(runtime.settings.redis_prefix)
        self.lease_s = runtime.settings.worker_lease_s
        kwargs.setdefault("serializer", JSONSerializer)
        # worker_ttl bounds how long a blocking dequeue waits between heartbeats.
        kwargs.setdefault("worker_ttl", max(20, self.lease_s))
        kwargs.setdefault("exception_handlers", [make_exception_handler(runtime.store)])
        super().__init__(queues, **kwargs)
        self._stop_reaper = threading.Event()

    # -- fairness between models ----------------------------------------------------------

    def reorder_queues(self, reference_queue: Queue) -> None:
        """Move the queue just dequeued from behind the other queues of its priority.

        RQ takes from the first non-empty queue in listen order: without the rotation a steady
        stream for one model would keep another model's jobs of the same priority waiting.
        Priorities keep their order (interactive before batch); legacy queues are not rotated.
        """
        priority = self._priority_by_queue.get(reference_queue.name)
        if priority is None:
            return
        order = self._ordered_queues
        slots = [i for i, q in enumerate(order) if self._priority_by_queue.get(q.name) == priority]
        tier = [order[i] for i in slots]
        served = [q for q in tier if q.name == reference_queue.name]
        rotated = [q for q in tier if q.name != reference_queue.name] + served
        for slot, queue in zip(slots, rotated, strict=True):
            order[slot] = queue

    # -- runs that found their job held by another attempt ---------------------------------

    def handle_job_success(
        self, job: Job, queue: Queue, started_job_registry: StartedJobRegistry, execution: Any
    ) -> None:
        """RQ marks a returned job finished. Not when this run did not take the job: found it
        held by another attempt (a dropped second copy, a superseded run), or could not read
        its record. Another run may share the one RQ job, and a finished one is skipped by the
        reaper, so that run's job would stay `running` for good if its worker died; and a job
        left for a worker that can read it keeps its RQ entry for the lost-jobs pass to push
        back. Only this run's execution is cleaned up."""
        if getattr(job, "_result", None) in NOT_THIS_RUNS:
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
                pipe.execute()
            if not self.connection.hexists(job.key, "origin"):
                # RQ's end-of-run heartbeat recreated the hash of a job the API had ended and
                # deleted meanwhile: a stub nothing would ever expire.
                self.connection.delete(job.key)
            return
        super().handle_job_success(job, queue, started_job_registry, execution)

    # -- leases ----------------------------------------------------------------------------

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """How long the job's registry entry stays valid without a renewal: the lease."""
        return self.lease_s

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()
        renewer = threading.Thread(
            target=self._renew_lease, args=(job, execution, stop), name="lease", daemon=True
        )
        self.runtime.watchdog.job_started()
        renewer.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            self.runtime.watchdog.job_ended()
            stop.set()
            renewer.join(timeout=5)
        self.set_state(WorkerStatus.IDLE)

    def _renew_lease(self, job: Job, execution: Any, stop: threading.Event) -> None:
        while not stop.wait(max(0.5, self.lease_s / 3)):
            quiet = self.runtime.watchdog.stalled_for()
            if quiet is not None and not stop.is_set():  # not a job that just finished
                # No renewal from here on: the lease and the presence key lapse.
                log.critical(
                    "job %s showed no progress for %.0f s (SELFCASCADE_STALLED_JOB_S %g): "
                    "this worker is wedged and exits; the job goes to another worker",
                    job.id, quiet, self.runtime.watchdog.limit_s,
                )
                self.on_stall()
                return
            try:
                self.maintain_heartbeats(job, execution)
                self.publish_presence()
            except Exception:
                log.exception("lease renewal failed for job %s", job.id)

    # -- presence (/readyz, /v1/models) -----------------------------------------------------

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        super().heartbeat(timeout, pipeline)
        self.publish_presence()

    def publish_presence(self) -> None:
        info = {
            "name": self.name,
            "pid": os.getpid(),
            "models": sorted(self.runtime.models),
            "gpu_memory_bytes": gpu_memory_in_use(),
            "at": time.time(),
        }
        # Outlives one blocking dequeue (worker_ttl - 15 s) plus slack, and no more.
        self.connection.set(self.keys.worker(self.name), json.dumps(info), ex=self.worker_ttl)

    def register_death(self) -> None:
        self.connection.delete(self.keys.worker(self.name))
        super().register_death()

    # -- reaper ----------------------------------------------------------------------------

    def queues_to_reap(self) -> list[Queue]:
        """This worker's queues, then those of every other model that has a queue in Redis,
        read on every pass. The reaper hands back abandoned jobs of every model, not only this
        worker's: a pool whose last worker died (and scaled to zero), or a model removed from
        the models file, has no worker of its own left to do it (a requeued job of a removed
        model is then failed `model_unavailable` by the API's retired-model sweep)."""
        known = {queue.name for queue in self.queues}
        settings = self.runtime.settings
        others = sorted(models_with_queues(self.connection, settings))
        return self.queues + [
            queue for queue in generation_queues(self.connection, settings, others)
            if queue.name not in known
        ]

    def start_reaper(self) -> threading.Thread:
        thread = threading.Thread(target=self._reap_forever, name="reaper", daemon=True)
        thread.start()
        return thread

    def stop_reaper(self) -> None:
        self._stop_reaper.set()

    def _reap_forever(self) -> None:
        interval = self.runtime.settings.reaper_interval_s
        swept_at = 0.0
        suspects: set[str] = set()  # jobs a dequeue may have lost, seen on the last pass
        lost_pass_at = 0.0
        while not self._stop_reaper.wait(interval):
            try:
                held = reap_abandoned_jobs(
                    self.connection, self.queues_to_reap, self.keys, interval,
                    self._exc_handlers,
                )
                if held and time.monotonic() - lost_pass_at >= LOST_JOBS_PASS_INTERVAL_S:
                    lost_pass_at = time.monotonic()
                    suspects = recover_lost_jobs(
                        self.connection, self.runtime.settings, self.runtime.store, suspects
                    )
                # One sweep per interval across all workers: concurrent sweeps of a shared
                # results directory race (a folder removed while a job writes into it).
                if time.time() - swept_at > RESULT_SWEEP_INTERVAL_S and self.connection.set(
                    self.keys.result_sweep_lock(), "1", nx=True, ex=int(RESULT_SWEEP_INTERVAL_S)
                ):
                    swept_at = time.time()
                    cutoff = swept_at - self.runtime.settings.result_ttl_s
                    removed = self.runtime.storage.delete_older_than(cutoff)
                    if removed:
                        log.info("deleted %d expired results", removed)
            except Exception:
                log.exception("reaper pass failed; will retry")


def _exit_for_restart() -> None:
    # os._exit, not sys.exit: the main thread is stuck in native code and would never unwind.
    # A plain flush, not logging.shutdown(), which would wait on locks the stuck thread may hold.
    for stream in (sys.stderr, sys.stdout):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(EXIT_WEDGED)


def reap_abandoned_jobs(
    redis: Redis,
    queues: Callable[[], list[Queue]],
    keys: RedisKeys,
    interval: float,
    handlers: list[Any],
) -> bool:
    """Let RQ retry or fail jobs whose lease lapsed; one worker at a time does it (`queues` is
    asked only by the worker that holds the lock). True when this worker held it."""
    if not redis.set(keys.reaper_lock(), "1", nx=True, px=max(100, int(interval * 900))):
        return False
    for queue in queues():
        StartedJobRegistry(queue=queue).cleanup(exception_handlers=handlers)
    return True
