"""A reply from Redis lost mid-job (the command ran, its answer never came): the job still ends
with its result, counted once, its `completed` webhook queued once.

The in-process worker talks to Redis through a proxy that loses one reply
(tests/service/redis_faults.py); the test reads and writes Redis directly.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from rq.exceptions import AbandonedJobError
from rq.job import Job
from rq.job import JobStatus as RQJobStatus

from contract import histograms
from contract.endings import OWED_FIELD, Owed
from contract.jobs import GenerationParams, JobEvent, JobOrigin, JobStatus
from contract.keys import RedisKeys
from contract.queueing import enqueue_generation, generation_queue
from contract.settings import load_model_specs, select_worker_models
from contract.state import JobStore
from contract.storage import build_storage
from tests.live_stack import wait_for
from tests.service.conftest import SettingsFactory
from tests.service.redis_faults import FlakyRedisProxy
from tests.worker.conftest import reap_after_lapse, start_as, take_as_rq_does, work_burst
from tests.worker.conftest import submit as submit_plain
from worker import job as job_module
from worker import resident
from worker.abandoned import make_exception_handler
from worker.job import HELD_ELSEWHERE, run_generation
from worker.resident import WorkerRuntime

pytestmark = pytest.mark.integration

HOOK = "http://127.0.0.1:9/hook"


@pytest.fixture
def proxy(redis_url: str) -> Iterator[FlakyRedisProxy]:
    flaky = FlakyRedisProxy(redis_url)
    yield flaky
    flaky.close()


@pytest.fixture
def flaky_runtime(
    settings_for: SettingsFactory, proxy: FlakyRedisProxy
) -> Iterator[WorkerRuntime]:
    settings = settings_for(
        redis_url=proxy.url, webhook_secret="s3cret", webhook_allow_http=True,
        webhook_allowed_networks="127.0.0.0/8",
    )
    store = JobStore(Redis.from_url(proxy.url), RedisKeys(settings.redis_prefix), 600)
    rt = WorkerRuntime(
        settings=settings, store=store, storage=build_storage(settings),
        worker_name=f"flaky-{uuid.uuid4().hex[:6]}",
    )
    specs = select_worker_models(load_model_specs(settings), settings)
    rt.models = resident.load_models(specs, settings)
    resident.install(rt)
    yield rt
    resident.RESIDENT.clear()


def submit(redis: Redis, rt: WorkerRuntime) -> str:
    """A job whose webhook wants every event, created over a direct connection."""
    job_id = uuid.uuid4().hex
    params = GenerationParams(prompt="p", model="tiny", width=128, height=128, seed=1, steps=4)
    origin = JobOrigin(webhook=HOOK, webhook_events_filter=["start", "progress", "completed"])
    JobStore(redis, rt.store.keys, 600).create(job_id, params, time.time(), origin)
    enqueue_generation(generation_queue(redis, rt.settings, "tiny"), job_id, rt.settings)
    return job_id


def webhook_events(redis: Redis, keys: RedisKeys, job_id: str) -> list[str]:
    entries = (json.loads(raw) for raw in redis.zrange(keys.webhooks(), 0, -1))
    return [entry["event"] for entry in entries if entry["job_id"] == job_id]


@pytest.mark.parametrize(
    "markers",
    [
        pytest.param((b"EVALSHA", b'"type":"succeeded"'), id="the final status"),
        pytest.param((b"EVALSHA", b'"type":"started"'), id="the start"),
        pytest.param((b"ZADD", b'"event":"progress"'), id="a progress webhook"),
        pytest.param((b"HINCRBYFLOAT", b"inference_seconds"), id="the inference histogram"),
    ],
)
def test_a_lost_reply_costs_the_job_neither_its_result_nor_its_count_nor_its_webhook(
    flaky_runtime: WorkerRuntime, proxy: FlakyRedisProxy, redis_client: Redis,
    markers: tuple[bytes, ...],
) -> None:
    rt = flaky_runtime
    proxy.lose_reply_to(*markers)
    job_id = submit(redis_client, rt)
    work_burst(rt)
    assert proxy.faults == 1  # the reply named was the one lost
    record = JobStore(redis_client, rt.store.keys, 600).get(job_id)
    assert record is not None
    assert record.status is JobStatus.SUCCEEDED, record.error
    assert len(record.outputs) == 1
    assert webhook_events(redis_client, rt.store.keys, job_id).count("completed") == 1
    finished = histograms.read_counts(redis_client, rt.store.keys, histograms.JOBS_FINISHED)
    assert finished == {"succeeded": 1}


def test_a_lost_last_progress_write_still_ends_the_job_at_full_progress(
    flaky_runtime: WorkerRuntime, proxy: FlakyRedisProxy, redis_client: Redis
) -> None:
    # The write of the last step never reached Redis (a blip): the job used to show
    # `succeeded` at the progress of the step before.
    rt = flaky_runtime
    proxy.lose_request_to(b"EVALSHA", b'"type":"progress"', b'"stage":2', b'"fraction":1.0')
    job_id = submit(redis_client, rt)
    work_burst(rt)
    assert proxy.faults == 1
    record = JobStore(redis_client, rt.store.keys, 600).get(job_id)
    assert record is not None and record.status is JobStatus.SUCCEEDED, record
    assert record.progress is not None
    assert (record.progress.stage, record.progress.fraction) == (2, 1.0)


def test_the_reaper_pays_what_an_ending_whose_reply_was_lost_still_owes(
    settings_for: SettingsFactory, redis_client: Redis
) -> None:
    settings = settings_for(webhook_secret="s3cret")
    store = JobStore(redis_client, RedisKeys(settings.redis_prefix), 600)
    job_id = uuid.uuid4().hex
    params = GenerationParams(prompt="p", model="tiny", width=64, height=64, seed=1, steps=2)
    store.create(job_id, params, time.time() - 5, JobOrigin(webhook=HOOK))
    # A worker's `failed` landed and its reply was lost: the status, with what it still owes.
    event = JobEvent(type="failed", status=JobStatus.FAILED, at=time.time())
    fields = {"finished_at": time.time(), OWED_FIELD: Owed.RAN.value}
    assert store.transition(job_id, [JobStatus.QUEUED], JobStatus.FAILED, event, fields)
    handler: Any = make_exception_handler(store)
    job = Job.create("worker.job.run_generation", id=job_id, connection=redis_client)
    for _ in range(2):  # the next pass finds it paid
        handler(job, AbandonedJobError, AbandonedJobError(), None)
    assert webhook_events(redis_client, store.keys, job_id) == ["completed"]
    assert histograms.read_counts(redis_client, store.keys, histograms.JOBS_FINISHED) == {
        "failed": 1
    }
    buckets, _ = histograms.read_histogram(redis_client, store.keys, histograms.E2E_LATENCY)
    assert dict(buckets)["+Inf"] == 1  # its latency, once
    assert redis_client.hget(store.keys.job(job_id), OWED_FIELD) is None


def test_a_run_whose_job_another_attempt_took_over_stops_and_records_nothing(
    runtime_for: Any, redis_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Cut off past its lease, a worker finds its job requeued and started elsewhere: it stops
    between two steps (its result would be dropped), and writes neither files nor record."""
    rt = runtime_for()
    # Long enough (three stages up to 256^2) to be mid-run at its next ownership check, 1 s on:
    # 60 steps at 64^2 often ended first, and the test failed on a quiet machine.
    job_id = submit_plain(rt, steps=100, width=256, height=256)
    outcome: list[str] = []
    # The job function itself (RQ's worker wants the main thread for its signal handlers).
    runner = threading.Thread(target=lambda: outcome.append(run_generation(job_id)))
    runner.start()
    job_key = rt.store.keys.job(job_id)
    wait_for(lambda: redis_client.hget(job_key, "progress"), 60, "the run to make progress")
    redis_client.hset(job_key, mapping={"worker": "elsewhere", "attempts": "2"})  # taken over
    runner.join(120)
    assert outcome == [HELD_ELSEWHERE]
    assert f"job {job_id} is no longer this run's" in caplog.text  # stopped mid-run
    record = rt.store.get(job_id)
    assert record is not None and record.status is JobStatus.RUNNING  # the other run's to end
    assert record.outputs == [] and record.worker == "elsewhere"
    assert not list(rt.settings.results_dir.glob(f"**/{job_id}*"))


def test_a_start_that_never_reached_redis_is_sent_again_and_the_job_runs(
    flaky_runtime: WorkerRuntime, proxy: FlakyRedisProxy, redis_client: Redis
) -> None:
    rt = flaky_runtime
    proxy.lose_request_to(b"EVALSHA", b'"type":"started"')
    job_id = submit(redis_client, rt)
    work_burst(rt)
    assert proxy.faults == 1
    record = JobStore(redis_client, rt.store.keys, 600).get(job_id)
    assert record is not None and record.status is JobStatus.SUCCEEDED and record.attempts == 1


def test_a_failed_run_speaks_only_for_a_job_it_holds(
    settings_for: SettingsFactory, redis_client: Redis
) -> None:
    """RQ's handler after the job function raised: a job its start never reached, or one
    another worker has taken over, is not that run's to fail."""
    settings = settings_for()
    store = JobStore(redis_client, RedisKeys(settings.redis_prefix), 600)
    handler: Any = make_exception_handler(store)
    params = GenerationParams(prompt="p", model="tiny", width=64, height=64, seed=1, steps=2)
    never_started, taken_over = uuid.uuid4().hex, uuid.uuid4().hex
    for job_id in (never_started, taken_over):
        store.create(job_id, params, time.time())
    fields = {"worker": "other", "attempts": 2}
    assert store.transition(taken_over, [JobStatus.QUEUED], JobStatus.RUNNING, None, fields)
    for job_id in (never_started, taken_over):
        job = Job.create("worker.job.run_generation", id=job_id, connection=redis_client)
        job.worker_name = "cut-off"
        handler(job, ConnectionError, ConnectionError("Redis away"), None)
    statuses = [store.get(j).status for j in (never_started, taken_over)]  # type: ignore[union-attr]
    assert statuses == [JobStatus.QUEUED, JobStatus.RUNNING]


def test_a_second_copy_of_a_job_a_live_worker_runs_is_dropped(
    runtime_for: Any, redis_client: Redis
) -> None:
    rt = runtime_for()
    job_id = submit_plain(rt)
    fields = {"worker": "alive", "attempts": 1}
    assert rt.store.transition(job_id, [JobStatus.QUEUED], JobStatus.RUNNING, None, fields)
    redis_client.set(rt.store.keys.worker("alive"), "{}", ex=30)  # its presence key
    assert run_generation(job_id) == HELD_ELSEWHERE
    record = rt.store.get(job_id)
    assert record is not None and (record.worker, record.attempts) == ("alive", 1)


def test_a_finished_result_is_kept_when_redis_cannot_say_whose_the_job_is(
    runtime_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = runtime_for()

    def away(*args: object) -> bool:
        raise RedisConnectionError("Redis away")

    monkeypatch.setattr(JobStore, "holds", away)
    monkeypatch.setattr(job_module, "FINISH_RETRY_S", 0.2)
    job_id = submit_plain(rt)
    work_burst(rt)
    record = rt.store.get(job_id)
    assert record is not None and record.status is JobStatus.SUCCEEDED and record.outputs


def test_a_dropped_copy_leaves_the_job_to_the_run_that_holds_it(
    runtime_for: Any, redis_client: Redis
) -> None:
    """Both copies share one RQ job: had the dropped one marked it finished, the reaper would
    skip the other run's lapsed lease, and a death of its worker would leave the job `running`
    for good."""
    rt = runtime_for()
    job_id = submit_plain(rt)
    queue = generation_queue(redis_client, rt.settings, "tiny")
    job = start_as(rt, job_id, "B")  # on a 1 s lease
    queue.push_job_id(job_id)  # a second copy, dropped by this worker
    work_burst(rt)
    assert job.get_status(refresh=True) is RQJobStatus.STARTED
    reap_after_lapse(rt, "B")  # B dies: the reaper hands the job back
    record = rt.store.get(job_id)
    assert record is not None and record.status is JobStatus.QUEUED


def test_the_lapsed_lease_of_a_dropped_copy_leaves_the_run_that_holds_it_alone(
    runtime_for: Any, redis_client: Redis
) -> None:
    """A copy's worker killed after RQ registered the copy and before it was dropped: that
    lease lapses while the holder's does not; the holder's run is not requeued under it."""
    rt = runtime_for()
    job_id = submit_plain(rt)
    queue = generation_queue(redis_client, rt.settings, "tiny")
    start_as(rt, job_id, "holder", lease_s=30)
    queue.push_job_id(job_id)
    take_as_rq_does(rt, job_id, "copy", lease_s=1)
    reap_after_lapse(rt, "copy")
    record = rt.store.get(job_id)
    assert record is not None and record.status is JobStatus.RUNNING
    assert (record.worker, record.attempts) == ("holder", 1)
