"""One real stack (Redis, a worker subprocess, uvicorn) for the playground and client tests.

A context manager rather than a fixture so test packages with their own conftest can share it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from redis import Redis

from contract.settings import Settings
from service.app import create_app
from tests.conftest import free_port
from tests.live_stack import ApiServer, WorkerProcess
from tests.service.conftest import make_settings


@dataclass
class RunningStack:
    settings: Settings
    api: ApiServer
    worker: WorkerProcess

    @property
    def url(self) -> str:
        return self.api.url


def write_tiny_model(folder: Path) -> Path:
    from selfcascade.tiny_models import save_tiny_sd

    path = folder / "tiny"
    save_tiny_sd(path)
    return path


@contextmanager
def running_stack(
    redis_url: str, data_dir: Path, model_dir: Path, name: str, **overrides: object
) -> Iterator[RunningStack]:
    settings = make_settings(
        redis_url, f"t{uuid.uuid4().hex[:10]}", data_dir, model_dir, **overrides
    )
    redis = Redis.from_url(redis_url)
    worker = WorkerProcess(settings, name, data_dir).start()
    try:
        worker.wait_ready(redis)
        with ApiServer(create_app(settings), free_port()) as api:
            yield RunningStack(settings, api, worker)
    finally:
        worker.stop()
        redis.close()
