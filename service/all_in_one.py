"""`selfcascade-serve` (`make run`): Redis (embedded when none is configured), one worker, the
webhook deliverer and the API on one machine, stopped together on Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

import httpx

from contract.exit_codes import RESTART_EXIT_CODES
from contract.log_format import configure_logging
from contract.settings import settings_from_env
from service.embedded_redis import EmbeddedRedis, EmbeddedRedisBusy

log = logging.getLogger("selfcascade.serve")

READY_TIMEOUT_S = 300.0  # the first start writes the tiny model and imports torch
# A worker finishing its current step and the API draining its connections fit well inside it.
STOP_GRACE_S = 30.0
# A worker asking for a restart sooner than this after its start is crash-looping: stop instead.
CRASH_LOOP_S = 60.0


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

    children = [
        Child("worker", ["-m", "worker.main"], restartable=True),
        # Webhooks are sent by their own small process, never from the GPU loop.
        Child("webhooks", ["-m", "service.webhook_worker"]),
        Child(
            "api",
            ["-m", "service.main", "--host", settings.host, "--port", str(settings.port)],
        ),
    ]

    def stop(signum: int, _frame: FrameType | None) -> None:
        _ignore_stop_signals()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    # Also SIGINT: a process started from a non-interactive shell's background job inherits
    # SIGINT as ignored, and Python then never raises KeyboardInterrupt for it.
    signal.signal(signal.SIGINT, stop)
    try:
        for child in children:
            child.start(env)
        url = f"http://{settings.host}:{settings.port}"
        wait_until_ready(url, [child.process for child in children if child.process])
        print(f"selfcascade is serving on {url}  (docs: {url}/docs; Ctrl-C stops)", flush=True)
        gone = keep_running(children, env)
        log.error("the %s process %s; shutting down", gone.name, describe_exit(gone.exit_code))
    except KeyboardInterrupt:
        log.info("shutting down")
    finally:
        _ignore_stop_signals()
        try:
            _stop_all([child.process for child in children if child.process])
        finally:
            if embedded is not None:
                embedded.stop()


def _ignore_stop_signals() -> None:
    """From the start of the shutdown on: a second signal (Ctrl-C pressed twice, or make passing
    on the SIGTERM that a process-group kill already delivered) must not cut it short and leave
    the embedded Redis running."""

    def already_stopping(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping already (at most %.0f s)", STOP_GRACE_S)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, already_stopping)


@dataclass
class Child:
    """One process of the stack; `restartable` ones are started again when they exit asking
    for it (contract.exit_codes) or are killed (the out-of-memory killer), as an orchestrator
    would."""

    name: str
    args: list[str]  # after the interpreter
    restartable: bool = False
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    def start(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen([sys.executable, *self.args], env=env)
        self.started_at = time.monotonic()

    @property
    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()


def keep_running(children: list[Child], env: dict[str, str], poll_s: float = 0.5) -> Child:
    """Watch the children until one exits for good, and return it.

    A restartable child that exits asking for a restart (a wedged job, a broken CUDA context),
    or that a signal killed (the out-of-memory killer's SIGKILL on a large image), is started
    again: its job's lease lapses and the new worker's reaper retries the job. One that goes
    within CRASH_LOOP_S of starting is crash-looping, or failing at start, and ends the stack.
    """
    while True:
        for child in children:
            code = child.exit_code
            if code is None:
                continue
            ran_s = time.monotonic() - child.started_at
            if child.restartable and _wants_restart(code) and ran_s > CRASH_LOOP_S:
                log.warning(
                    "the %s process %s; starting a new one", child.name, describe_exit(code)
                )
                child.start(env)
                continue
            return child
        time.sleep(poll_s)


def _wants_restart(code: int) -> bool:
    return code in RESTART_EXIT_CODES or code < 0  # < 0: killed by that signal


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        hint = " (the out-of-memory killer?)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited ({code})"


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
