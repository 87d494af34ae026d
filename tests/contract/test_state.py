"""Job state transitions against a real Redis: atomic, guarded, with their events."""

from __future__ import annotations

import time

import pytest
from redis import Redis

from contract.endings import Owed, end_job
from contract.jobs import (
    ErrorCode,
    ErrorInfo,
    GenerationParams,
    JobEvent,
    JobStatus,
    ProgressRecord,
)
from contract.keys import RedisKeys
from contract.state import Attempt, JobStore

PARAMS = GenerationParams(prompt="p", model="tiny", width=64, height=64, seed=5)


@pytest.fixture
def store(redis_client: Redis, key_prefix: str) -> JobStore:
    return JobStore(redis_client, RedisKeys(key_prefix), result_ttl_s=60)


def test_create_then_read_round_trips(store: JobStore) -> None:
    created = store.create("c" * 32, PARAMS, 123.5)
    read = store.get("c" * 32)
    assert read == created
    assert read is not None and read.status is JobStatus.QUEUED and read.params == PARAMS
    assert [e.type for _, e in store.read_events("c" * 32)] == ["queued"]
    assert store.get("d" * 32) is None


def test_transition_only_from_allowed_statuses(store: JobStore) -> None:
    job = "e" * 32
    store.create(job, PARAMS, time.time())
    event = JobEvent(type="canceled", status=JobStatus.CANCELED, at=time.time())
    assert store.transition(job, [JobStatus.QUEUED], JobStatus.CANCELED, event)
    started = JobEvent(type="started", status=JobStatus.RUNNING, at=time.time())
    # A worker picking the job up after the cancel must lose the race.
    live = [JobStatus.QUEUED, JobStatus.RUNNING]
    assert not store.transition(job, live, JobStatus.RUNNING, started)
    record = store.get(job)
    assert record is not None and record.status is JobStatus.CANCELED
    assert [e.type for _, e in store.read_events(job)] == ["queued", "canceled"]


def test_terminal_transition_sets_fields_and_expiry(store: JobStore, redis_client: Redis) -> None:
    job = "f" * 32
    store.create(job, PARAMS, time.time())
    store.transition(job, [JobStatus.QUEUED], JobStatus.RUNNING, None, {"attempts": 1})
    half = ProgressRecord(stage=1, stages=1, step=1, steps=2, fraction=0.5)
    assert store.report_progress(job, half)
    error = ErrorInfo(code=ErrorCode.OUT_OF_MEMORY, message="oom")
    failed = JobEvent(type="failed", status=JobStatus.FAILED, at=time.time(), error=error)
    assert store.transition(job, [JobStatus.RUNNING], JobStatus.FAILED, failed, {"error": error})
    record = store.get(job)
    assert record is not None and record.error == error and record.attempts == 1
    assert record.progress is not None and record.progress.fraction == 0.5
    assert 0 < redis_client.ttl(store.keys.job(job)) <= 60
    assert 0 < redis_client.ttl(store.keys.events(job)) <= 60
    # Progress after the end is ignored rather than resurrecting the job.
    done = ProgressRecord(stage=1, stages=1, step=2, steps=2, fraction=1)
    assert not store.report_progress(job, done)


def test_cancel_flag(store: JobStore) -> None:
    assert not store.cancel_requested("1" * 32)
    store.request_cancel("1" * 32)
    assert store.cancel_requested("1" * 32)


def test_status_terminality() -> None:
    assert {s for s in JobStatus if s.is_terminal} == {
        JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED
    }


def test_writes_of_an_attempt_another_one_superseded_are_refused(store: JobStore) -> None:
    """A worker cut off from Redis past its lease: its job was requeued and started elsewhere."""
    job = "a" * 32
    store.create(job, PARAMS, time.time())
    live = [JobStatus.QUEUED, JobStatus.RUNNING]
    first, second = Attempt("w1", 1), Attempt("w2", 2)
    for attempt in (first, second):
        fields = {"worker": attempt.worker, "attempts": attempt.number}
        assert store.transition(job, live, JobStatus.RUNNING, None, fields)
    half = ProgressRecord(stage=1, stages=1, step=1, steps=2, fraction=0.5)
    assert not store.holds(job, first) and store.holds(job, second)
    assert not store.report_progress(job, half, first)
    done = JobEvent(type="succeeded", status=JobStatus.SUCCEEDED, at=time.time())
    ended = end_job(store, job, live, JobStatus.SUCCEEDED, done, {}, Owed.RAN, attempt=first)
    assert not ended
    assert store.report_progress(job, half, second)
    assert end_job(store, job, live, JobStatus.SUCCEEDED, done, {}, Owed.RAN, attempt=second)
