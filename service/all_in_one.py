"""`selfcascade-serve` (`make run`): Redis (embedded when none is configured), one worker and
the API on one machine, stopped together on Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

import httpx

from contract.log_format import configure_logging
from contract.settings import settings_from_env
from service.embedded_redis import EmbeddedRedis, EmbeddedRedisBusy

log = logging.getLogger("selfcascade.serve")

READY_TIMEOUT_S = 300.0  # the first start writes the tiny model and imports torch
# A worker finishing its current step and the API draining its connections fit well inside it.
STOP_GRACE_S = 30.0


def main() -> None:
    settings = settings_from_env()
    configure_logging(settings.log_format)
    # Before anything starts: a taken port would only show as the API child dying later.
    if not _port_free(settings.host, settings.port):
        raise SystemExit(
            f"{settings.host}:{settings.port} is in use (another make run?); stop it or set "
            "SELFCASCADE_PORT"
        )
    env = dict(os.environ)
    embedded: EmbeddedRedis | None = None
    if not settings.redis_url:
        embedded = EmbeddedRedis(settings.data_dir / "redis")
        try:
            embedded.start()
        except EmbeddedRedisBusy as exc:
            raise SystemExit(str(exc)) from None
        env["SELFCASCADE_REDIS_URL"] = embedded.url

    children: list[subprocess.Popen[bytes]] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    # Also SIGINT: a process started from a non-interactive shell's background job inherits
    # SIGINT as ignored, and Python then never raises KeyboardInterrupt for it.
    signal.signal(signal.SIGINT, stop)
    try:
        children.append(subprocess.Popen([sys.executable, "-m", "worker.main"], env=env))
        # Webhooks are sent by their own small process, never from the GPU loop.
        children.append(subprocess.Popen([sys.executable, "-m", "service.webhook_worker"], env=env))
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "service.main", "--host", settings.host,
                 "--port", str(settings.port)],
                env=env,
            )
        )
        url = f"http://{settings.host}:{settings.port}"
        wait_until_ready(url, children)
        print(f"selfcascade is serving on {url}  (docs: {url}/docs; Ctrl-C stops)", flush=True)
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        log.error("a child process exited; shutting down")
    except KeyboardInterrupt:
        log.info("shutting down")
    finally:
        _stop_all(children)
        if embedded is not None:
            embedded.stop()


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As uvicorn binds: SO_REUSEADDR, so a port in TIME_WAIT after a stop counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def wait_until_ready(
    url: str, children: list[subprocess.Popen[bytes]], timeout_s: float = READY_TIMEOUT_S
) -> None:
    """Poll /readyz until a worker holds a model; fail fast if a child process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            raise SystemExit("the worker or the API exited during start-up")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"not ready after {timeout_s:.0f}s")


def _stop_all(children: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to every child at once, then one shared grace period: stopping takes at most
    STOP_GRACE_S however many children there are (one per child added up could outlast the
    patience of whoever pressed Ctrl-C)."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        try:
            child.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop within %.0fs; killing it", child.pid, STOP_GRACE_S)
            child.kill()
            child.wait(timeout=5)


if __name__ == "__main__":
    main()
