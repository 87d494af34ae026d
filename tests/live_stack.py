"""Real processes for integration tests: the API under uvicorn, workers as subprocesses.

Named by what they are, with timeouts everywhere so a broken stack fails fast instead of hanging.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from redis import Redis

from contract.keys import RedisKeys
from contract.settings import Settings
from service.serving import DrainingServer

REPO = Path(__file__).resolve().parents[1]
WORKER_START_TIMEOUT_S = 120.0


def settings_env(settings: Settings) -> dict[str, str]:
    """The SELFCASCADE_* environment that reproduces `settings` in a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFCASCADE_")}
    env.pop("REDIS_URL", None)
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, list):
            value = ",".join(str(item) for item in value)  # as Settings reads a list of paths
        env[f"SELFCASCADE_{name.upper()}"] = str(value)
    env["PYTHONPATH"] = str(REPO)
    return env


def wait_for(
    predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


class WorkerProcess:
    """`python -m worker.main` as a child process, ready once its presence key appears."""

    def __init__(self, settings: Settings, name: str, log_dir: Path) -> None:
        self.settings = settings
        self.name = name
        self.log_path = log_dir / f"worker-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.main", "--name", self.name, "--log-level", "info"],
            env=settings_env(self.settings),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self

    def wait_ready(self, redis: Redis) -> WorkerProcess:
        key = RedisKeys(self.settings.redis_prefix).worker(self.name)

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log()}")
            return bool(redis.exists(key))

        wait_for(ready, WORKER_START_TIMEOUT_S, f"worker {self.name}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        return self.process.returncode


class ApiServer:
    """The real app under a real uvicorn on a loopback port, in a thread of the test process."""

    def __init__(self, app: Any, port: int) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        # As `selfcascade-api` serves: streams and waits end as the server stops. An app wrapped
        # in a test's own ASGI layer has no services to read: plain uvicorn then.
        services = getattr(getattr(app, "state", None), "services", None)
        self.server = DrainingServer(config, services) if services else uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ApiServer:
        self.thread.start()
        wait_for(lambda: self.server.started, 15, "uvicorn start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10)


def write_models_file(path: Path, model_dir: Path, names: Sequence[str] = ("tiny",)) -> Path:
    """A models file naming the 64 px tiny model at `model_dir` once per name."""
    entry = {"path": str(model_dir), "native_width": 64, "native_height": 64}
    path.write_text(json.dumps({"models": [{"name": name, **entry} for name in names]}))
    return path


def wait_status(client: httpx.Client, job_id: str, statuses: set[str], timeout_s: float) -> dict:
    def reached() -> dict | None:
        body = client.get(f"/v1/generations/{job_id}").json()
        return body if body["status"] in statuses else None

    result: dict = wait_for(reached, timeout_s, f"{job_id} to reach {statuses}", 0.1)
    return result
