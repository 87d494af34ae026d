"""A model removed from the models file: its queued jobs fail with a clear error once no API
process lists it and no worker holds it, and not a moment before (rollouts)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from redis import Redis
from rq.job import Job

from contract.jobs import GenerationParams, JobStatus
from contract.queueing import enqueue_generation, generation_queue
from service.app import create_app
from service.retired_models import RetiredModelSweeper
from service.services import ApiServices
from tests.conftest import free_port
from tests.live_stack import ApiServer, wait_status, write_models_file
from tests.service.conftest import SettingsFactory

pytestmark = pytest.mark.integration


@pytest.fixture
def both_models(tmp_path: Path, tiny_model_dir: Path) -> Path:
    return write_models_file(tmp_path / "both.json", tiny_model_dir, ("tiny", "tiny-b"))


@pytest.fixture
def tiny_only(tmp_path: Path, tiny_model_dir: Path) -> Path:
    return write_models_file(tmp_path / "tiny-only.json", tiny_model_dir, ("tiny",))


def queue_job(services: ApiServices, model: str) -> str:
    """A queued job for `model`, as an API that listed it would have left it."""
    job_id = uuid.uuid4().hex
    params = GenerationParams(prompt="p", model=model, width=64, height=64, seed=1, steps=2)
    services.store.create(job_id, params, time.time())
    enqueue_generation(generation_queue(services.redis, services.settings, model), job_id,
                       services.settings)
    return job_id


def status_of(services: ApiServices, job_id: str) -> JobStatus:
    record = services.store.get(job_id)
    assert record is not None
    return record.status


def test_queued_jobs_of_a_removed_model_fail_with_model_unavailable_over_http(
    settings_for: SettingsFactory, both_models: Path, tiny_only: Path, redis_client: Redis
) -> None:
    old = settings_for(models_file=both_models, retired_model_sweep_s=0.2)
    with ApiServer(create_app(old), free_port()) as api, api.client() as client:
        ids = {}
        for model in ("tiny", "tiny-b"):
            reply = client.post("/v1/generations", json={"prompt": "p", "model": model})
            assert reply.status_code == 202, reply.text
            ids[model] = reply.json()["id"]
        time.sleep(0.6)  # a few sweeps: both models are listed, nothing fails
        assert client.get(f"/v1/generations/{ids['tiny-b']}").json()["status"] == "queued"

    # The rollout that removes tiny-b: the old API has stopped, no worker holds tiny-b.
    new = settings_for(models_file=tiny_only, retired_model_sweep_s=0.2)
    with ApiServer(create_app(new), free_port()) as api, api.client() as client:
        body = wait_status(client, ids["tiny-b"], {"failed"}, timeout_s=10)
        assert body["error"]["code"] == "model_unavailable"
        assert "model 'tiny-b' is no longer served" in body["error"]["message"]
        # The model this API still lists keeps its job waiting for a worker.
        assert client.get(f"/v1/generations/{ids['tiny']}").json()["status"] == "queued"

    services = ApiServices.build(new)
    assert generation_queue(services.redis, new, "tiny-b").count == 0
    assert not redis_client.exists(Job.key_for(ids["tiny-b"]))


def test_a_removed_model_is_not_retired_while_a_live_worker_still_holds_it(
    settings_for: SettingsFactory, both_models: Path, tiny_only: Path, redis_client: Redis
) -> None:
    services = ApiServices.build(settings_for(models_file=tiny_only))
    job_id = queue_job(services, "tiny-b")
    # An old worker, still up during the rollout, drains tiny-b's queue: its presence record.
    presence = services.keys.worker("old-worker")
    redis_client.set(presence, json.dumps({"name": "old-worker", "models": ["tiny-b"]}), ex=30)
    sweeper = RetiredModelSweeper(services, settle_s=0)
    assert sweeper.pass_once() == 0
    assert status_of(services, job_id) is JobStatus.QUEUED

    redis_client.delete(presence, services.keys.retired_model_sweep_lock())
    assert sweeper.pass_once() == 1
    assert status_of(services, job_id) is JobStatus.FAILED


def test_a_removed_model_is_not_retired_while_another_api_process_lists_it(
    settings_for: SettingsFactory, both_models: Path, tiny_only: Path, redis_client: Redis
) -> None:
    old_api = RetiredModelSweeper(
        ApiServices.build(settings_for(models_file=both_models)), settle_s=0
    )
    new_api = RetiredModelSweeper(
        ApiServices.build(settings_for(models_file=tiny_only)), settle_s=0
    )
    job_id = queue_job(new_api.services, "tiny-b")  # accepted by the old replica
    lock = new_api.services.keys.retired_model_sweep_lock()

    old_api.pass_once()  # publishes tiny and tiny-b
    redis_client.delete(lock)
    assert new_api.pass_once() == 0
    assert status_of(new_api.services, job_id) is JobStatus.QUEUED

    old_api.stop()  # the old replica goes away, and says so at once
    redis_client.delete(lock)
    assert new_api.pass_once() == 1
    record = new_api.services.store.get(job_id)
    assert record is not None and record.error is not None
    assert record.error.code.value == "model_unavailable"


def test_one_api_process_sweeps_per_interval(
    settings_for: SettingsFactory, tiny_only: Path
) -> None:
    services = ApiServices.build(settings_for(models_file=tiny_only, retired_model_sweep_s=60))
    first, second = (RetiredModelSweeper(services, settle_s=0) for _ in range(2))
    job_id = queue_job(services, "tiny-b")
    assert second.pass_once() == 1 and status_of(services, job_id) is JobStatus.FAILED
    later = queue_job(services, "tiny-b")
    assert first.pass_once() == 0  # the lock is held for this interval
    assert status_of(services, later) is JobStatus.QUEUED


def test_a_process_judges_nothing_until_every_live_process_has_had_time_to_publish(
    settings_for: SettingsFactory, both_models: Path, tiny_only: Path, redis_client: Redis
) -> None:
    # Replica B serves tiny-b; its key lapsed in a Redis outage (or replica A just started).
    # A must not take the silence for a retirement before B has had a pass to publish again.
    a = RetiredModelSweeper(ApiServices.build(settings_for(models_file=tiny_only)), settle_s=0.5)
    b = RetiredModelSweeper(ApiServices.build(settings_for(models_file=both_models)), settle_s=0)
    job_id = queue_job(a.services, "tiny-b")
    assert a.pass_once() == 0  # just started publishing: no judgement yet
    b.pass_once()
    time.sleep(0.6)
    redis_client.delete(a.services.keys.retired_model_sweep_lock())
    assert a.pass_once() == 0 and status_of(a.services, job_id) is JobStatus.QUEUED

    b.stop()  # B really goes away: now tiny-b is retired
    redis_client.delete(a.services.keys.retired_model_sweep_lock())
    assert a.pass_once() == 1


def test_a_sweeper_restarts_with_its_app(settings_for: SettingsFactory, tiny_only: Path) -> None:
    sweeper = RetiredModelSweeper(ApiServices.build(settings_for(models_file=tiny_only)))
    for _ in range(2):  # a second lifespan on one app (TestClient used twice)
        sweeper.start()
        sweeper.stop()


def test_an_entry_whose_record_is_gone_leaves_nothing_behind(
    settings_for: SettingsFactory, tiny_only: Path, redis_client: Redis
) -> None:
    sweeper = RetiredModelSweeper(ApiServices.build(settings_for(models_file=tiny_only)), 0)
    job_id = queue_job(sweeper.services, "tiny-b")
    redis_client.delete(sweeper.services.keys.job(job_id))
    assert sweeper.pass_once() == 0
    assert generation_queue(redis_client, sweeper.services.settings, "tiny-b").count == 0
    assert not redis_client.exists(Job.key_for(job_id))
