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
from tests.live_stack import REPO

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
