"""`selfcascade client generate`'s body fields and API-key scopes, and its output piped into a
reader that leaves early, against the real API on loopback in keys mode with no worker: these
jobs only need to exist (they stay queued)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, get_args

import httpx
import pytest
from redis import Redis

from contract.jobs import OutputFormat, Priority, WebhookEvent
from contract.keys import RedisKeys
from contract.settings import Settings
from selfcascade import client_cli
from selfcascade.cli import main
from selfcascade.client import ServiceClient
from service.app import create_app
from tests.conftest import free_port
from tests.live_stack import REPO, ApiServer
from tests.selfcascade.client_network import FaultyNetwork, Forward, create_call, events_stream
from tests.service.conftest import make_settings

pytestmark = pytest.mark.integration

FULL_KEY = "full-token-0123456789abcdef"  # generate and read
GENERATE_ONLY_KEY = "gen-token-0123456789abcdef"  # generate, not read


@dataclass
class KeyedApi:
    settings: Settings
    api: ApiServer
    redis: Redis

    @property
    def url(self) -> str:
        return self.api.url

    def job(self, job_id: str) -> dict[str, Any]:
        with self.api.client() as client:
            answer = client.get(f"/v1/generations/{job_id}", headers=bearer(FULL_KEY))
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    def status(self, job_id: str) -> str:
        """Whichever key made the job (another key's GET is a 404)."""
        status = self.redis.hget(RedisKeys(self.settings.redis_prefix).job(job_id), "status")
        assert isinstance(status, bytes), status
        return status.decode()

    def job_count(self) -> int:
        keys = self.redis.scan_iter(match=f"{self.settings.redis_prefix}:job:*")
        return sum(1 for key in keys if key.count(b":") == 2)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def keyed(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedApi]:
    folder = tmp_path_factory.mktemp("client-keys")
    keys_file = folder / "keys.json"
    keys_file.write_text(json.dumps([
        {"id": "full", "token": FULL_KEY, "scopes": ["generate", "read"]},
        {"id": "gen", "token": GENERATE_ONLY_KEY, "scopes": ["generate"]},
    ]))
    settings = make_settings(
        redis_url, f"t{uuid.uuid4().hex[:10]}", folder / "data", folder / "model",
        auth_mode="keys", api_keys_file=keys_file, webhook_secret="s3cret",
        webhook_allow_http=True, webhook_allowed_networks="127.0.0.0/8",
    )
    redis = Redis.from_url(redis_url)
    try:
        with ApiServer(create_app(settings), free_port()) as api:
            yield KeyedApi(settings, api, redis)
    finally:
        redis.close()


def recording_client(
    monkeypatch: pytest.MonkeyPatch, token: str, network: FaultyNetwork | None = None
) -> FaultyNetwork:
    """The command's client sends through `network` (returned): every request it made is kept."""
    network = network or FaultyNetwork()
    monkeypatch.setattr(
        client_cli, "_client",
        lambda args: ServiceClient(args.server, api_key=token, transport=network),
    )
    return network


def sent_body(network: FaultyNetwork) -> dict[str, Any]:
    [create] = network.sent(create_call)
    body: dict[str, Any] = json.loads(create.content)
    return body


def test_generate_sends_every_body_field_it_was_given(
    keyed: KeyedApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    network = recording_client(monkeypatch, FULL_KEY)
    argv = ["client", "generate", "--server", keyed.url, "--prompt", "a kite", "--width", "128"]
    argv += ["--guidance-scale", "5", "--pivot-strength", "0.5", "--scheduler", "euler"]
    argv += ["--upsample-mode", "bicubic", "--lr-features", "per_stage", "--priority", "batch"]
    argv += ["--webhook", "http://127.0.0.1:9/hook"]
    argv += ["--webhook-events-filter", "start", "completed"]
    assert main(argv) == 0

    assert sent_body(network) == {
        "prompt": "a kite", "width": 128, "guidance_scale": 5.0, "pivot_strength": 0.5,
        "scheduler": "euler", "upsample_mode": "bicubic", "lr_features": "per_stage",
        "priority": "batch", "webhook": "http://127.0.0.1:9/hook",
        "webhook_events_filter": ["start", "completed"],
    }
    job = keyed.job(capsys.readouterr().out.split()[1])  # "generation <id> queued: ..."
    params = job["params"]
    assert (params["guidance_scale"], params["pivot_strength"]) == (5.0, 0.5)
    assert (params["scheduler"], params["upsample_mode"]) == ("euler", "bicubic")
    assert params["lr_features"] == "per_stage" and job["priority"] == "batch"
    assert job["webhook"] == "http://127.0.0.1:9/hook"
    assert sorted(job["webhook_events_filter"]) == ["completed", "start"]


def test_generate_leaves_what_was_not_typed_to_the_servers_defaults(
    keyed: KeyedApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    network = recording_client(monkeypatch, FULL_KEY)
    assert main(["client", "generate", "--server", keyed.url, "--prompt", "a kite"]) == 0
    assert sent_body(network) == {"prompt": "a kite"}
    job = keyed.job(capsys.readouterr().out.split()[1])
    assert job["params"]["guidance_scale"] == 7.5 and job["params"]["scheduler"] == "ddim"
    assert job["priority"] == "interactive" and job["webhook"] is None


def test_a_value_the_server_refuses_is_its_422_in_one_line(
    keyed: KeyedApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SELFCASCADE_API_KEY", FULL_KEY)
    jobs = keyed.job_count()
    argv = ["client", "generate", "--server", keyed.url, "--prompt", "x"]
    assert main([*argv, "--pivot-strength", "1.5"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfcascade client: error: 422 invalid_request: pivot_strength"), err
    assert "\n" not in err
    # Neither NaN nor infinity can be written in JSON: refused by argparse, nothing sent.
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--guidance-scale", "nan"])
    assert exited.value.code == 2
    assert "--guidance-scale: expected a finite number, got 'nan'" in capsys.readouterr().err
    assert keyed.job_count() == jobs


def test_the_clients_choice_lists_are_the_apis() -> None:
    assert get_args(OutputFormat) == client_cli.OUTPUT_FORMATS
    assert get_args(Priority) == client_cli.PRIORITIES
    assert get_args(WebhookEvent) == client_cli.WEBHOOK_EVENTS


def test_a_key_that_may_not_read_is_refused_before_a_job_it_could_not_follow(
    keyed: KeyedApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SELFCASCADE_API_KEY", GENERATE_ONLY_KEY)
    jobs = keyed.job_count()
    argv = ["client", "generate", "--server", keyed.url, "--prompt", "x", "--wait"]
    assert main(argv) == 1
    assert capsys.readouterr().err.strip() == (
        "selfcascade client: error: 403 forbidden: this API key lacks the 'read' scope, which "
        "--wait and --out need to follow the job; nothing was submitted: use a key with both "
        "generate and read, or leave out --wait and --out"
    )
    assert keyed.job_count() == jobs  # no job left queued that nobody follows

    # Without --wait or --out nothing is read back: the job is submitted as before.
    assert main(["client", "generate", "--server", keyed.url, "--prompt", "x"]) == 0
    assert capsys.readouterr().out.startswith("generation ")
    assert keyed.job_count() == jobs + 1


def forbidden(request: httpx.Request, forward: Forward) -> httpx.Response:
    """The API's refusal of a key without `read`."""
    message = "this API key lacks the 'read' scope"
    error = {"code": "forbidden", "message": message, "param": "Authorization"}
    return httpx.Response(403, json={"error": error})


def models_list(request: httpx.Request) -> bool:
    return request.url.path == "/v1/models"


def answered_models(request: httpx.Request, forward: Forward) -> httpx.Response:
    """A server whose model list any key may read (so it cannot warn before the job exists)."""
    return httpx.Response(200, json={"data": []})


def refused_generate_wait(
    keyed: KeyedApi,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    token: str,
    network: FaultyNetwork,
) -> tuple[str, str]:
    """`client generate --wait` with `token` through `network`, which ends refused (exit 1):
    the id of the job it made, and its last line on stderr."""
    recording_client(monkeypatch, token, network)
    argv = ["client", "generate", "--server", keyed.url, "--prompt", "x", "--wait"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    return captured.out.split()[1], captured.err.strip().splitlines()[-1]


def test_following_refused_after_submitting_cancels_the_job(
    keyed: KeyedApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    network = FaultyNetwork()
    network.inject(events_stream, forbidden)
    job_id, said = refused_generate_wait(keyed, monkeypatch, capsys, FULL_KEY, network)
    assert said == (
        "selfcascade client: error: 403 forbidden: this API key lacks the 'read' scope, needed "
        f"to follow the job; canceled {job_id}: use a key with both generate and read"
    )
    assert keyed.job(job_id)["status"] == "canceled"  # not left queued, unfollowed


def test_when_the_cancel_is_refused_too_the_line_says_the_job_still_runs(
    keyed: KeyedApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    network = FaultyNetwork()
    network.inject(models_list, answered_models)
    job_id, said = refused_generate_wait(keyed, monkeypatch, capsys, GENERATE_ONLY_KEY, network)
    refused = "403 forbidden: this API key lacks the 'read' scope"
    assert said == (
        f"selfcascade client: error: {refused}, needed to follow the job; could not cancel "
        f"{job_id} either ({refused}), so it still runs: use a key with both generate and read"
    )
    assert keyed.status(job_id) == "queued"


def client_into_a_closed_pipe(*argv: str, token: str) -> subprocess.CompletedProcess[str]:
    """`selfcascade client ...` whose stdout is a pipe nobody reads any more (`| head -1` once
    head has left): every write to it fails with EPIPE."""
    program = "import sys; from selfcascade.cli import main; sys.exit(main(sys.argv[1:]))"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-c", program, "client", *argv], cwd=REPO, text=True,
            stdout=write_end, stderr=subprocess.PIPE, timeout=60,
            env={**os.environ, "SELFCASCADE_API_KEY": token, "PYTHONPATH": str(REPO)},
        )
    finally:
        os.close(write_end)


def test_output_into_a_reader_that_left_stops_quietly(keyed: KeyedApi) -> None:
    with ServiceClient(keyed.url, api_key=FULL_KEY) as client:
        job_id = client.create({"prompt": "piped"})["id"]
    for command in (["status", job_id, "--json"], ["status", job_id], ["cancel", job_id]):
        done = client_into_a_closed_pipe(*command, "--server", keyed.url, token=FULL_KEY)
        assert (done.returncode, done.stderr) == (141, ""), command  # 128 + SIGPIPE, no traceback
    assert keyed.job(job_id)["status"] == "canceled"  # the command itself still ran
