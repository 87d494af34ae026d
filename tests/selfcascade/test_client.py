"""`selfcascade client` against a real stack, and the SSE parser and auth header on their own."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from selfcascade.cli import main
from selfcascade.client import ClientError, ServiceClient, parse_sse, server_from_env
from tests.conftest import free_port
from tests.live_stack import REPO, wait_status
from tests.running_stack import RunningStack, running_stack, write_tiny_model


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    folder = tmp_path_factory.mktemp("client")
    with running_stack(redis_url, folder / "data", write_tiny_model(folder), "client-1") as running:
        yield running


@pytest.mark.integration
def test_generate_waits_and_downloads_the_image(
    stack: RunningStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fox.png"
    argv = ["client", "generate", "--server", stack.url, "--prompt", "a red fox"]
    argv += ["--width", "128", "--height", "96", "--steps", "4", "--seed", "5", "--out", str(out)]
    assert main(argv) == 0

    captured = capsys.readouterr()
    assert "seed 5" in captured.out and "UNet evaluations" in captured.out
    assert f"wrote {out} (128x96" in captured.out
    assert "succeeded" in captured.err and "100%" in captured.err  # the progress bar's last state
    with Image.open(out) as image:
        assert image.size == (128, 96)

    job_id = captured.out.split()[1]
    assert main(["client", "status", job_id, "--server", stack.url]) == 0
    status = capsys.readouterr().out
    assert f"{job_id}: succeeded" in status and "128x96" in status and "output http" in status


@pytest.mark.integration
def test_server_comes_from_the_environment_and_queued_jobs_cancel(
    stack: RunningStack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SELFCASCADE_SERVER", stack.url)
    argv = ["client", "generate", "--prompt", "slow", "--steps", "150", "--method", "direct"]
    assert main(argv) == 0  # no --wait: submit and return
    job_id = capsys.readouterr().out.split()[1]
    assert main(["client", "cancel", job_id]) == 0
    # Queued: canceled at once; already running: it stops between two steps.
    assert capsys.readouterr().out.strip() in (
        f"{job_id}: canceled",
        f"{job_id}: cancel requested (running)",
    )
    wait_status(stack.api.client(), job_id, {"canceled"}, 60)
    assert main(["client", "status", job_id]) == 0
    assert capsys.readouterr().out.startswith(f"{job_id}: canceled")


@pytest.mark.integration
def test_validation_error_is_one_line_naming_the_field(
    stack: RunningStack, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["client", "generate", "--server", stack.url, "--prompt", "x"]
    assert main([*argv, "--width", "1024", "--height", "1024", "--wait"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfcascade client: error: 422 invalid_request: width:"), err
    assert "\n" not in err


def test_unknown_job_and_dead_server_are_one_line_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["client", "status", "0" * 32, "--server", dead]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"selfcascade client: error: cannot reach the server at {dead}")
    assert "\n" not in err


def test_api_key_is_sent_as_a_bearer_token(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no such"}})

    client = ServiceClient("http://api.test", "sk-123", transport=httpx.MockTransport(answer))
    with client, pytest.raises(ClientError, match="404 not_found: no such"):
        client.get("abc")
    assert seen[0].headers["authorization"] == "Bearer sk-123"
    assert server_from_env({}) == "http://127.0.0.1:8000"
    assert server_from_env({"SELFCASCADE_SERVER": "http://x:1"}) == "http://x:1"


def test_sse_parser_skips_keepalives_and_joins_data_lines() -> None:
    lines = [
        ": keepalive",
        "",
        "id: 1-0",
        "event: progress",
        'data: {"status":',
        'data: "running"}',
    ]
    lines += ["", "event: succeeded", 'data: {"status": "succeeded"}', ""]
    events = list(parse_sse(lines))
    assert [(e.type, e.id, e.is_terminal) for e in events] == [
        ("progress", "1-0", False),
        ("succeeded", None, True),
    ]
    assert events[0].data == {"status": "running"}


def test_client_needs_no_torch() -> None:
    program = (
        "import sys; from selfcascade.client_cli import main; "
        "import selfcascade.client; "
        "assert not {'torch', 'diffusers'} & set(sys.modules), sorted(sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
