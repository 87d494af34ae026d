"""Mid-upgrade, a worker may meet a job record written by a newer release that it cannot decode
(a value it does not know). It must neither crash nor decide the job's fate from a guess: it
leaves a queued job for a worker that can read it, mirrors RQ's verdict on a running one from the
record's head, and a job no worker ever reads ends `worker_lost`, counted like any other."""

from __future__ import annotations

import json
from typing import Any

import pytest
from redis import Redis
from rq.job import Job
from rq.job import JobStatus as RQJobStatus

from contract import histograms
from contract.endings import OWED_FIELD
from contract.queueing import generation_queue
from contract.state import UnreadableRecord
from tests.worker.conftest import reap_after_lapse, start_as, submit, work_burst
from tests.worker.test_lost_jobs import indexed, one_pass, two_passes_a_minute_apart
from worker.lost_jobs import MAX_TIMES_LOST

pytestmark = pytest.mark.integration


def write_as_a_newer_release(redis_client: Redis, job_key: str) -> None:
    """A scheduler this release does not know, in the job's params."""
    params = json.loads(redis_client.hget(job_key, "params"))  # type: ignore[arg-type]
    redis_client.hset(job_key, "params", json.dumps({**params, "scheduler": "from-the-future"}))


def test_a_record_no_worker_can_read_stays_queued_then_fails_worker_lost_counted(
    runtime_for: Any, redis_client: Redis
) -> None:
    rt = runtime_for()
    job_id = submit(rt)
    job_key = rt.store.keys.job(job_id)
    write_as_a_newer_release(redis_client, job_key)
    with pytest.raises(UnreadableRecord, match=f"record of job {job_id} cannot be read"):
        rt.store.get(job_id)

    work_burst(rt)  # takes it, cannot read it, leaves it: no crash, no verdict
    assert redis_client.hget(job_key, "status") == b"queued"
    queue = generation_queue(redis_client, rt.settings, "tiny")
    assert queue.get_job_ids() == []
    assert Job.fetch(job_id, connection=redis_client).get_status() is not RQJobStatus.FINISHED
    two_passes_a_minute_apart(rt, job_id)
    assert queue.get_job_ids() == [job_id]  # back, for a worker that can read it
    for _ in range(MAX_TIMES_LOST):
        work_burst(rt)  # no worker here can
        two_passes_a_minute_apart(rt, job_id)

    assert redis_client.hget(job_key, "status") == b"failed"
    assert b"worker_lost" in redis_client.hget(job_key, "error")  # type: ignore[operator]
    # What its ending owes is paid though the record cannot be decoded (not its webhook).
    assert redis_client.hget(job_key, OWED_FIELD) is None
    finished = histograms.read_counts(redis_client, rt.store.keys, histograms.JOBS_FINISHED)
    assert finished == {"failed": 1}
    assert not redis_client.exists(Job.key_for(job_id)) and indexed(rt) == set()


def test_one_unreadable_job_does_not_stop_the_pass_for_other_lost_jobs(
    runtime_for: Any, redis_client: Redis
) -> None:
    rt = runtime_for()
    bad, good = submit(rt), submit(rt)
    write_as_a_newer_release(redis_client, rt.store.keys.job(bad))
    queue = generation_queue(redis_client, rt.settings, "tiny")
    for job_id in (bad, good):  # both lost by dequeues; RQ's entry of `bad` has expired too
        assert redis_client.lrem(queue.key, 0, job_id) == 1
    redis_client.delete(Job.key_for(bad))

    assert one_pass(rt, one_pass(rt, set())) == set()
    assert queue.get_job_ids() == [good]  # its queue cannot be told for `bad`: only counted
    for _ in range(MAX_TIMES_LOST):
        two_passes_a_minute_apart(rt, bad)
    assert redis_client.hget(rt.store.keys.job(bad), "status") == b"failed"


def test_the_reaper_requeues_an_unreadable_job_whose_worker_died(
    runtime_for: Any, redis_client: Redis
) -> None:
    rt = runtime_for()
    job_id = submit(rt)
    start_as(rt, job_id, "newer-worker")
    write_as_a_newer_release(redis_client, rt.store.keys.job(job_id))
    reap_after_lapse(rt, "newer-worker")
    queue = generation_queue(redis_client, rt.settings, "tiny")
    assert queue.get_job_ids() == [job_id]  # RQ's retry ...
    assert redis_client.hget(rt.store.keys.job(job_id), "status") == b"queued"  # ... mirrored
    assert indexed(rt) == {job_id}


def test_an_unreadable_second_copy_leaves_the_job_to_the_run_that_holds_it(
    runtime_for: Any, redis_client: Redis
) -> None:
    rt = runtime_for()
    job_id = submit(rt)
    queue = generation_queue(redis_client, rt.settings, "tiny")
    job = start_as(rt, job_id, "newer-worker")
    write_as_a_newer_release(redis_client, rt.store.keys.job(job_id))
    queue.push_job_id(job_id)  # a second copy, which this (older) worker takes
    work_burst(rt)
    assert job.get_status(refresh=True) is RQJobStatus.STARTED  # the newer run's books stand

    reap_after_lapse(rt, "newer-worker")  # so its death is noticed
    assert redis_client.hget(rt.store.keys.job(job_id), "status") == b"queued"
    assert queue.get_job_ids() == [job_id]
