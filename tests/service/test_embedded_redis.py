"""The embedded Redis of `make run`: one per data directory, so a second `make run` is refused
with a clear line instead of taking over the first one's socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from redis import Redis

from service.embedded_redis import EmbeddedRedis, EmbeddedRedisBusy
from tests.conftest import free_port
from tests.live_stack import REPO, wait_for

pytestmark = pytest.mark.integration


def test_a_second_server_on_the_same_data_dir_is_refused_and_the_first_keeps_serving(
    tmp_path: Path,
) -> None:
    first, second = EmbeddedRedis(tmp_path / "redis"), EmbeddedRedis(tmp_path / "redis")
    first.start()
    try:
        with pytest.raises(EmbeddedRedisBusy, match="another selfcascade-serve"):
            second.start()
        client = Redis.from_url(first.url)
        assert client.ping()  # its socket was not taken over
        client.close()
    finally:
        first.stop()
    second.start()  # free again once the first stopped
    second.stop()


def test_the_server_stops_when_the_process_that_started_it_is_killed(tmp_path: Path) -> None:
    """A selfcascade-serve killed outright (SIGKILL, the OOM killer) must not leave its Redis
    running, holding the data directory for good."""
    data = tmp_path / "redis"
    starter = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from pathlib import Path;"
            "from service.embedded_redis import EmbeddedRedis;"
            f"EmbeddedRedis(Path({str(data)!r})).start(); print('up', flush=True); time.sleep(600)"
        )],
        cwd=REPO, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert starter.stdout is not None and starter.stdout.readline() == b"up\n"
    assert Redis(unix_socket_path=str(data / "redis.sock")).ping()
    starter.kill()
    starter.wait(timeout=10)
    wait_for(lambda: not _running_on(data), 10, "the orphaned Redis to stop", 0.05)
    again = EmbeddedRedis(data)
    again.start()  # the data directory is free
    again.stop()


def _running_on(data: Path) -> bool:
    found = subprocess.run(["pgrep", "-f", str(data)], capture_output=True, text=True)
    return bool(found.stdout.strip())


def test_serve_refuses_a_port_in_use_before_starting_anything(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFCASCADE_")}
    env.pop("REDIS_URL", None)
    env.update(PORT=str(port), SELFCASCADE_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(REPO))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "-m", "service.all_in_one"], env=env, cwd=tmp_path,
            capture_output=True, text=True, timeout=60, check=False,
        )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"127.0.0.1:{port} is in use (another make run?); stop it or set SELFCASCADE_PORT"
    )
    assert not (tmp_path / "data" / "redis").exists()  # no Redis was started
