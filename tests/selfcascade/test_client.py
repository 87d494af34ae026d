"""`selfcascade client` against a real stack, and the SSE parser and auth header on their own."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from selfcascade import client_cli
from selfcascade.cli import main
from selfcascade.client import ClientError, ServiceClient, parse_sse, server_from_env
from tests.conftest import free_port
from tests.live_stack import REPO, wait_status
from tests.running_stack import RunningStack, running_stack, write_tiny_model
from tests.selfcascade.client_network import (
    FaultyNetwork,
    after_first_event,
    cut,
    error_event,
    events_stream,
    halfway,
    output_file,
)


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
    argv += ["--metadata", "order=A-7", "--metadata", "note=x=y"]
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
    assert "  metadata order=A-7, note=x=y\n" in status


def test_a_metadata_argument_without_a_key_is_refused_before_submitting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["client", "generate", "--server", "http://127.0.0.1:9", "--prompt", "x"]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--metadata", "=7"])
    assert exited.value.code == 2
    assert "--metadata: expected KEY=VALUE, got '=7'" in capsys.readouterr().err


@pytest.mark.integration
def test_the_out_files_extension_picks_the_output_format(
    stack: RunningStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fox.jpg"
    argv = ["client", "generate", "--server", stack.url, "--prompt", "a red fox", "--width", "64"]
    assert main([*argv, "--height", "64", "--steps", "2", "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == "JPEG"  # not png bytes in a .jpg


def test_an_out_file_name_contradicting_the_output_format_is_refused_before_submitting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["client", "generate", "--server", "http://127.0.0.1:9", "--prompt", "x"]
    assert main([*argv, "--output-format", "mp4", "--out", "clip.png"]) == 2
    assert capsys.readouterr().err.strip() == (
        "selfcascade client: error: --out clip.png names a .png file, but --output-format is mp4"
    )


def test_an_out_file_extension_the_service_cannot_write_is_refused_before_submitting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Nothing listens on port 9: a request sent would fail with exit 1, not 2.
    argv = ["client", "generate", "--server", "http://127.0.0.1:9", "--retry-budget", "0"]
    assert main([*argv, "--prompt", "x", "--out", "shapes.bmp"]) == 2
    assert capsys.readouterr().err.strip() == (
        "selfcascade client: error: --out shapes.bmp names a .bmp file, which the service cannot "
        "write (it writes .png, .webp, .jpeg, .mp4, .webm, .gif; .jpg for jpeg)"
    )
    assert main([*argv, "--prompt", "x", "--out", "shapes"]) == 1  # a bare name is sent
    assert "cannot reach the server at http://127.0.0.1:9" in capsys.readouterr().err


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


def finished_job(stack: RunningStack) -> dict[str, Any]:
    """A small image generation, run to the end by the stack's worker."""
    with ServiceClient(stack.url) as client:
        job = client.create({"prompt": "a kite", "width": 64, "height": 64, "steps": 2})
    return wait_status(stack.api.client(), job["id"], {"succeeded"}, 120)


@pytest.mark.integration
def test_event_stream_resumes_after_each_cut_however_many(stack: RunningStack) -> None:
    # A load balancer that cuts every stream: far more cuts than the 2 s budget would allow
    # back to back, but each cut follows an event, which renews the budget.
    network = FaultyNetwork()
    network.inject(events_stream, cut(after_first_event), times=100)
    with ServiceClient(stack.url, transport=network, retry_budget_s=2) as client:
        job = client.create({"prompt": "cuts", "width": 64, "height": 64, "steps": 8})
        seen = list(client.events(job["id"]))
    with ServiceClient(stack.url) as client:
        whole = list(client.events(job["id"]))  # read in one go

    assert seen[-1].type == "succeeded" and [e.id for e in seen] == [e.id for e in whole]
    assert len(seen) >= 6  # queued, started, progress..., succeeded: one per connection
    reconnects = network.sent(events_stream)[1:]
    assert [r.headers["Last-Event-ID"] for r in reconnects] == [e.id for e in seen[:-1]]


@pytest.mark.integration
def test_generate_rides_out_an_error_event_and_a_cut_download(
    stack: RunningStack,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    network = FaultyNetwork()
    network.inject(events_stream, error_event)  # the API lost its Redis for a moment
    network.inject(output_file, cut(halfway))
    monkeypatch.setattr(
        client_cli, "_client", lambda args: ServiceClient(args.server, transport=network)
    )
    out = tmp_path / "kite.png"
    argv = ["client", "generate", "--server", stack.url, "--prompt", "a kite"]
    assert main([*argv, "--width", "64", "--height", "64", "--steps", "2", "--out", str(out)]) == 0

    assert f"wrote {out} (64x64" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (64, 64)
    assert len(network.sent(events_stream)) == 2 and len(network.sent(output_file)) == 2
    assert list(tmp_path.iterdir()) == [out]  # the cut try left no partial file


@pytest.mark.integration
def test_a_failed_download_never_replaces_the_file(stack: RunningStack, tmp_path: Path) -> None:
    [output] = finished_job(stack)["outputs"]
    destination = tmp_path / "kept.png"
    destination.write_bytes(b"a good earlier file")
    network = FaultyNetwork()
    network.inject(output_file, cut(halfway), times=100)
    checks = {"size": output["bytes"], "sha256": output["sha256"]}

    impatient = ServiceClient(stack.url, transport=network, retry_budget_s=0.5)
    with impatient, pytest.raises(ClientError, match="connection reset"):
        impatient.download(output["url"], destination, **checks)
    with ServiceClient(stack.url) as client:
        with pytest.raises(ClientError, match=f"the output has {'0' * 64}"):
            client.download(output["url"], destination, sha256="0" * 64)
        with pytest.raises(ClientError, match=f"gave {output['bytes']} bytes, the output has 1$"):
            client.download(output["url"], destination, size=1)
        assert destination.read_bytes() == b"a good earlier file"
        assert list(tmp_path.iterdir()) == [destination]

        assert client.download(output["url"], destination, **checks) == output["bytes"]
    assert hashlib.sha256(destination.read_bytes()).hexdigest() == output["sha256"]


def test_unknown_job_and_dead_server_are_one_line_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["client", "status", "0" * 32, "--server", dead, "--retry-budget", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"selfcascade client: error: cannot reach the server at {dead}")
    assert "\n" not in err


def test_a_dead_server_is_retried_within_the_budget() -> None:
    client = ServiceClient(f"http://127.0.0.1:{free_port()}", retry_budget_s=1.0)
    started = time.monotonic()
    with client, pytest.raises(ClientError, match="cannot reach the server"):
        client.get("0" * 32)
    assert 0.25 <= time.monotonic() - started < 1.5  # at least one backoff, never past the budget

    # What no retry can mend fails at once, whatever the budget.
    with ServiceClient("ftp://127.0.0.1:1") as client, pytest.raises(ClientError, match="ftp"):
        client.get("0" * 32)


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


def client_process(*argv: str) -> subprocess.Popen[str]:
    """`selfcascade client ...` in its own process, its stdout unbuffered (read line by line)."""
    program = "import sys; from selfcascade.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", program, "client", *argv], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)},
    )


@pytest.mark.integration
def test_ctrl_c_while_following_cancels_the_job_and_exits_130(stack: RunningStack) -> None:
    slow = ["--steps", "150", "--method", "direct", "--width", "256", "--height", "256"]
    process = client_process("generate", "--server", stack.url, "--prompt", "slow", *slow, "--wait")
    assert process.stdout is not None
    job_id = process.stdout.readline().split()[1]  # "generation <id> queued: ..."
    api = stack.api.client()
    wait_status(api, job_id, {"running"}, 60)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == f"interrupted: canceled {job_id}"
    assert wait_status(api, job_id, {"canceled"}, 60)["status"] == "canceled"


def test_ctrl_c_while_the_server_is_retried_exits_130_in_one_line() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    process = client_process("generate", "--server", dead, "--prompt", "x", "--retry-budget", "60")
    time.sleep(2)  # inside the create's retries of a refused connection
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    *retries, last = err.strip().splitlines()
    assert all("retrying in" in line for line in retries)  # the retry warnings, no traceback
    assert last == "interrupted before the server answered with a job"
