"""How many workers a pool needs: the jobs waiting for its models plus the jobs it runs now.

An autoscaler sized on waiting jobs alone (KEDA's Redis list triggers) sees a busy pool with an
empty queue as idle and takes workers away mid-load, to bring them back, model reload and all,
as soon as the queue grows again. Counting the running jobs too keeps one worker per job in
flight; and summing over every queue of the pool gives one number, where KEDA follows only the
busiest of several triggers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rq import Queue
from rq.registry import StartedJobRegistry

from contract.queueing import worker_queues
from service.services import ApiServices


@dataclass(frozen=True)
class WorkerDemand:
    models: list[str]
    waiting: int
    running: int

    @property
    def in_flight(self) -> int:
        return self.waiting + self.running


def worker_demand(services: ApiServices, models: Sequence[str]) -> WorkerDemand:
    """Jobs waiting in, and running from, every queue a worker holding `models` listens to
    (the legacy shared queues included, as the workers drain those too)."""
    queues = worker_queues(services.redis, services.settings, models)
    waiting = sum(len(queue) for queue in queues)
    return WorkerDemand(models=list(models), waiting=waiting, running=running_jobs(queues))


def running_jobs(queues: Iterable[Queue]) -> int:
    """Jobs started from `queues` and not finished. Counted without RQ's cleanup(), which
    `.count` runs: with no exception handlers it would fail a dead worker's job behind the
    reaper's back (worker/abandoned.py), record left running. Such a job counts as running
    until the reaper requeues it."""
    return sum(StartedJobRegistry(queue=queue).get_job_count(cleanup=False) for queue in queues)
