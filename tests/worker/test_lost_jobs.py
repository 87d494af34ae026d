"""A job a dequeue lost (the pop's reply lost, or its worker killed before the job started) goes
back on its queue after two reaper passes; jobs waiting, running or ended are left alone."""

from __future__ import annotations

from typing import Any

import pytest
from redis import Redis
from rq.job import Job

from contract.jobs import JobStatus
from contract.queueing import PRIORITIES, generation_queue, legacy_queues
from tests.worker.conftest import submit, work_burst
from worker.lost_jobs import MAX_TIMES_LOST, recover_lost_jobs
from worker.resident import WorkerRuntime

pytestmark = pytest.mark.integration


def one_pass(rt: WorkerRuntime, suspects: set[str]) -> set[str]:
    return recover_lost_jobs(rt.store.redis, rt.settings, rt.store, suspects, older_than_s=0)


def indexed(rt: WorkerRuntime) -> set[str]:
    return {m.decode() for m in rt.store.redis.zrange(rt.store.keys.queued_index(), 0, -1)}


def test_a_job_popped_and_lost_goes_back_on_its_queue_and_runs(
    runtime_for: Any, redis_client: Redis
) -> None:
    rt = runtime_for()
    job_id = submit(rt)
    queue = generation_queue(redis_client, rt.settings, "tiny")
    assert redis_client.lpop(queue.key) == job_id.encode()  # a pop whose worker never came back

    suspects = one_pass(rt, set())
    assert suspects == {job_id} and queue.get_job_ids() == []  # once missing: maybe a worker
    assert one_pass(rt, suspects) == set()  # twice: lost
    assert queue.get_job_ids() == [job_id]

    work_burst(rt)
    record = rt.store.get(job_id)
    assert record is not None and record.status is JobStatus.SUCCEEDED
    one_pass(rt, set())
    assert job_id not in indexed(rt)  # it started: out of the index


def test_jobs_that_wait_in_their_queue_are_left_alone(
    runtime_for: Any, redis_client: Redis
) -> None:
    rt = runtime_for()
    waiting = [submit(rt), submit(rt, "batch")]
    suspects: set[str] = set()
    for _ in range(3):
        suspects = one_pass(rt, suspects)
    assert suspects == set()
    queues = [generation_queue(redis_client, rt.settings, "tiny", p) for p in PRIORITIES]
    assert [q.get_job_ids() for q in queues] == [[waiting[0]], [waiting[1]]]  # never twice
    assert indexed(rt) == set(waiting)


def test_a_job_waiting_in_a_legacy_queue_is_not_pushed_twice(
    runtime_for: Any, redis_client: Redis
) -> None:
    rt = runtime_for()
    job_id = submit(rt)
    queue = generation_queue(redis_client, rt.settings, "tiny")
    [legacy, _] = legacy_queues(redis_client, rt.settings)
    # Requeued by RQ onto the queue it first came from: an older API's shared one.
    redis_client.lrem(queue.key, 0, job_id)
    redis_client.hset(Job.key_for(job_id), "origin", legacy.name)
    legacy.push_job_id(job_id)
    suspects: set[str] = set()
    for _ in range(3):
        suspects = one_pass(rt, suspects)
    assert (queue.get_job_ids(), legacy.get_job_ids()) == ([], [job_id])


def test_the_index_holds_exactly_the_queued_jobs(runtime_for: Any) -> None:
    rt = runtime_for()
    ran, canceled = submit(rt), submit(rt)
    assert indexed(rt) == {ran, canceled}
    fields = {"worker": "w", "attempts": 1}
    assert rt.store.transition(ran, [JobStatus.QUEUED], JobStatus.RUNNING, None, fields)
    assert rt.store.transition(canceled, [JobStatus.QUEUED], JobStatus.CANCELED, None)
    assert indexed(rt) == set()
    assert rt.store.transition(ran, [JobStatus.RUNNING], JobStatus.QUEUED, None)  # requeued
    assert indexed(rt) == {ran}


def lose_it_again(rt: WorkerRuntime, redis_client: Redis, job_id: str) -> None:
    """A dequeue loses the job (it is popped and never starts), and two passes find it."""
    queue = generation_queue(redis_client, rt.settings, "tiny")
    assert redis_client.lrem(queue.key, 0, job_id) == 1
    two_passes_a_minute_apart(rt, job_id)


def two_passes_a_minute_apart(rt: WorkerRuntime, job_id: str) -> None:
    """Two passes, with the once-a-minute guard on pushing a job back lifted."""
    rt.store.redis.delete(f"{rt.store.keys.queued_index()}:repushed:{job_id}")
    one_pass(rt, one_pass(rt, set()))


def test_a_job_lost_again_and_again_is_failed_not_pushed_back_for_ever(
    runtime_for: Any, redis_client: Redis
) -> None:
    rt = runtime_for()
    job_id = submit(rt)
    queue = generation_queue(redis_client, rt.settings, "tiny")
    for _ in range(MAX_TIMES_LOST):
        lose_it_again(rt, redis_client, job_id)
        assert queue.get_job_ids() == [job_id]  # back, as often as MAX_TIMES_LOST
    lose_it_again(rt, redis_client, job_id)

    record = rt.store.get(job_id)
    assert record is not None and record.status is JobStatus.FAILED and record.error is not None
    assert record.error.code == "worker_lost"
    assert f"off its queue {MAX_TIMES_LOST + 1} times" in record.error.message
    assert queue.get_job_ids() == [] and indexed(rt) == set()
    assert not redis_client.exists(Job.key_for(job_id))  # its RQ entry went with it
    assert [event.type for _, event in rt.store.read_events(job_id)][-1] == "failed"
