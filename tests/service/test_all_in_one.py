"""`selfcascade-serve` (what `make run` starts): embedded Redis with AOF, a worker, the API;
serves the whole flow and stops everything on Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service import all_in_one
from tests.conftest import free_port
from tests.live_stack import REPO, wait_for

pytestmark = pytest.mark.integration


def test_serve_runs_the_flow_on_an_embedded_redis_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFCASCADE_")}
    env.pop("REDIS_URL", None)
    env.update(PORT=str(port), SELFCASCADE_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(REPO))
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "service.all_in_one"], env=env, cwd=tmp_path, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: f"serving on {url}" in log.read_text(), 180, "serve to print its URL", 0.2)
        with httpx.Client(base_url=url, timeout=10) as client:
            job = client.post("/v1/generations", json={"prompt": "hi", "steps": 2}).json()

            def done() -> dict | None:
                body = client.get(f"/v1/generations/{job['id']}").json()
                return body if body["status"] in ("succeeded", "failed") else None

            final = wait_for(done, 120, "the job", 0.1)
            assert final["status"] == "succeeded", final
            assert client.get(final["outputs"][0]["url"]).status_code == 200
        assert (tmp_path / "data" / "redis" / "appendonly.aof").exists()
        assert (tmp_path / "data" / "models" / "tiny" / "model_index.json").exists()

        # As a terminal's Ctrl-C does: SIGINT to the whole foreground process group. Redis is in
        # its own session, so only selfcascade-serve stops it, after the worker. Then a second
        # signal, as `make` passes on a kill of its group, or an impatient second Ctrl-C: the
        # shutdown goes on to the end all the same.
        os.killpg(serve.pid, signal.SIGINT)
        wait_for(lambda: "shutting down" in log.read_text(), 30, "the shutdown to begin", 0.05)
        os.kill(serve.pid, signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
        stopped = log.read_text()
        assert "Error 2 connecting" not in stopped and "ConnectionError" not in stopped, stopped
        time.sleep(0.5)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/healthz", timeout=2)
        leftovers = subprocess.run(
            ["pgrep", "-f", str(tmp_path / "data" / "redis")], capture_output=True, text=True
        )
        assert leftovers.stdout.strip() == ""
    finally:
        # Its whole process group: a failed stop must not leave the worker, API and Redis behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait(timeout=10)
        # Redis runs in its own session (a terminal's Ctrl-C must not stop it under the worker).
        subprocess.run(["pkill", "-f", str(tmp_path / "data" / "redis")], check=False)


def stand_in(code: str) -> list[str]:
    """Arguments for the interpreter: a child process running `code`."""
    return ["-c", code]


@pytest.mark.parametrize(
    "first_end",
    [
        pytest.param("os._exit(75)", id="asking for a restart (wedged)"),
        # Was the end of the whole stack, API included: a large image on a small machine.
        pytest.param("os.kill(os.getpid(), 9)", id="killed (the out-of-memory killer)"),
    ],
)
def test_a_worker_that_goes_is_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_end: str
) -> None:
    monkeypatch.setattr(all_in_one, "CRASH_LOOP_S", 0.0)
    starts = tmp_path / "starts"
    # Ends on its first run, then keeps running like a healthy worker.
    worker = all_in_one.Child("worker", stand_in(
        f"import os, pathlib, time; p = pathlib.Path({str(starts)!r}); "
        "first = not p.exists(); p.write_text(p.read_text() + 'x' if p.exists() else 'x'); "
        f"{first_end} if first else time.sleep(60)"
    ), restartable=True)
    api = all_in_one.Child("api", stand_in("import time; time.sleep(3); raise SystemExit(3)"))
    children = [worker, api]
    try:
        for child in children:
            child.start(dict(os.environ))
        gone = all_in_one.keep_running(children, dict(os.environ), poll_s=0.05)
        assert gone is api and gone.exit_code == 3
        assert starts.read_text() == "xx" and worker.exit_code is None  # the second one runs
    finally:
        for child in children:
            if child.process and child.process.poll() is None:
                child.process.kill()


@pytest.mark.parametrize(
    ("code", "why"),
    [
        (75, "asks again right after starting"),
        (-9, "killed right after starting"),
        (1, "an ordinary failure"),
    ],
)
def test_a_worker_is_not_restarted_when(code: int, why: str) -> None:
    end = f"os.kill(os.getpid(), {-code})" if code < 0 else f"os._exit({code})"
    worker = all_in_one.Child("worker", stand_in(f"import os; {end}"), restartable=True)
    worker.start(dict(os.environ))
    gone = all_in_one.keep_running([worker], dict(os.environ), poll_s=0.05)
    assert gone is worker and gone.exit_code == code, why
