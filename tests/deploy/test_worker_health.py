"""The worker image's launcher and probes (docker/worker_health.py), run as the manifests and the
Dockerfile run them: settings through their aliases, the worker's own presence key, and a
Redis outage that fails startup but never liveness."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from redis import Redis

from contract.keys import RedisKeys
from contract.settings import Settings
from contract.state import JobStore
from contract.storage import build_storage
from tests.conftest import free_port
from tests.deploy.test_manifests import ROOT, _find, _kustomize
from worker.process import GenerationWorker
from worker.resident import WorkerRuntime

SCRIPT = ROOT / "docker" / "worker_health.py"
IMAGE_PATH = "/app/worker_health.py"  # where docker/worker.Dockerfile copies it


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("worker_health", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


health = _module()


def _probe_commands() -> dict[str, list[str]]:
    docs = _kustomize("gpu")
    spec = _find(docs, "Deployment", "selfcascade-worker")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    return {
        kind: container[f"{kind}Probe"]["exec"]["command"] for kind in ("startup", "liveness")
    }


def _run(command: list[str], env: dict[str, str], name_file: Path) -> subprocess.CompletedProcess:
    """Run a probe command as written in the manifest, with the script from this checkout."""
    assert command[:2] == ["python", IMAGE_PATH], command
    return subprocess.run(
        [sys.executable, str(SCRIPT), *command[2:]],
        cwd=ROOT, env={**env, "WORKER_NAME_FILE": str(name_file)},
        capture_output=True, text=True, timeout=60, check=False,
    )


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFCASCADE_")}
    env.pop("REDIS_URL", None)
    return {**env, **values}


def _publish_presence(redis: Redis, prefix: str, name: str, tmp_path: Path) -> None:
    """What the worker's heartbeat does: the real GenerationWorker.publish_presence."""
    settings = Settings(redis_prefix=prefix, data_dir=tmp_path / "data")
    runtime = WorkerRuntime(
        settings=settings,
        store=JobStore(redis, RedisKeys(prefix), settings.result_ttl_s),
        storage=build_storage(settings),
        worker_name=name,
    )
    GenerationWorker([], runtime=runtime, connection=redis, name=name).publish_presence()


def test_launcher_names_the_worker_after_the_pod_and_records_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name_file = tmp_path / "name"
    monkeypatch.setenv("WORKER_NAME", "selfcascade-worker-7d9f-abcde")
    first = health.launch(["--log-level", "debug"], name_file)
    name = name_file.read_text().strip()
    assert first == ["selfcascade-worker", "--log-level", "debug", "--name", name]
    assert name.startswith("selfcascade-worker-7d9f-abcde-")
    # A restarted container gets a new name: RQ refuses one whose old worker key still lives.
    health.launch([], name_file)
    assert name_file.read_text().strip() != name
    # An explicit --name wins and is what the probes look for.
    assert health.launch(["--name", "w1"], name_file) == ["selfcascade-worker", "--name", "w1"]
    assert name_file.read_text().strip() == "w1"
    monkeypatch.delenv("WORKER_NAME")
    assert health.worker_name([]).rsplit("-", 1)[0] == socket.gethostname()


def test_run_replaces_itself_with_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, list[str]]] = []

    def execvp(file: str, args: list[str]) -> None:
        calls.append((file, args))
        raise SystemExit(0)

    monkeypatch.setattr(health.os, "execvp", execvp)
    monkeypatch.setattr(health, "NAME_FILE", tmp_path / "name")
    monkeypatch.setenv("WORKER_NAME", "pod")
    with pytest.raises(SystemExit):
        health.main(["run", "--log-level", "debug"])
    [(file, args)] = calls
    name = (tmp_path / "name").read_text().strip()
    assert file == "selfcascade-worker"
    assert args == ["selfcascade-worker", "--log-level", "debug", "--name", name]


def test_the_images_run_the_launcher_and_probe_with_this_script() -> None:
    dockerfile = (ROOT / "docker" / "worker.Dockerfile").read_text()
    assert f"COPY docker/worker_health.py {IMAGE_PATH}" in dockerfile
    assert f'CMD ["python", "{IMAGE_PATH}", "run"]' in dockerfile
    assert f'CMD ["python", "{IMAGE_PATH}", "liveness"]' in dockerfile
    docs = _kustomize("gpu")
    container = _find(docs, "Deployment", "selfcascade-worker")["spec"]["template"]["spec"][
        "containers"
    ][0]
    # The image's CMD stays in charge (no command override), fed the pod name.
    assert "command" not in container and "args" not in container
    [name_env] = [env for env in container["env"] if env["name"] == "WORKER_NAME"]
    assert name_env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    commands = _probe_commands()
    assert commands["startup"][2:] == ["startup"]
    assert commands["liveness"][2:] == ["liveness"]
    assert "SELFCASCADE_REDIS_URL" not in str(container) and "readinessProbe" not in container


@pytest.mark.parametrize("variable", ["REDIS_URL", "SELFCASCADE_REDIS_URL"])
def test_probes_pass_while_the_worker_heartbeats_and_fail_when_its_key_lapses(
    variable: str, redis_url: str, redis_client: Redis, key_prefix: str, tmp_path: Path
) -> None:
    name_file = tmp_path / "name"
    name_file.write_text("pod-a-0123abcd\n")
    env = _env(**{variable: redis_url}, SELFCASCADE_REDIS_PREFIX=key_prefix)
    commands = _probe_commands()

    for kind, command in commands.items():
        done = _run(command, env, name_file)
        assert done.returncode == 1, (kind, done.stdout, done.stderr)  # not up yet
        assert "no presence key" in done.stderr

    # Another worker's key proves nothing about this one.
    _publish_presence(redis_client, key_prefix, "pod-b-4567abcd", tmp_path)
    assert _run(commands["liveness"], env, name_file).returncode == 1

    _publish_presence(redis_client, key_prefix, "pod-a-0123abcd", tmp_path)
    for kind, command in commands.items():
        done = _run(command, env, name_file)
        assert done.returncode == 0, (kind, done.stdout, done.stderr)

    # A wedged or dead loop stops re-publishing: the key's TTL lapses and liveness fails.
    redis_client.delete(RedisKeys(key_prefix).worker("pod-a-0123abcd"))
    done = _run(commands["liveness"], env, name_file)
    assert done.returncode == 1, done.stdout


def test_presence_key_has_a_ttl(redis_client: Redis, key_prefix: str, tmp_path: Path) -> None:
    _publish_presence(redis_client, key_prefix, "w", tmp_path)
    ttl = redis_client.ttl(RedisKeys(key_prefix).worker("w"))
    assert 0 < ttl <= max(20, Settings().worker_lease_s)


def test_redis_outage_fails_startup_but_not_liveness(tmp_path: Path) -> None:
    name_file = tmp_path / "name"
    name_file.write_text("pod-a-0123abcd\n")
    env = _env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    commands = _probe_commands()
    done = _run(commands["liveness"], env, name_file)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "redis unreachable" in done.stdout  # and says why it stays alive
    for kind in ("startup", "readiness"):
        done = _run(["python", IMAGE_PATH, kind], env, name_file)
        assert done.returncode == 1 and "redis unreachable" in done.stderr, done.stderr


def test_a_hung_redis_answers_within_the_probe_timeout(tmp_path: Path) -> None:
    name_file = tmp_path / "name"
    name_file.write_text("w\n")
    docs = _kustomize("gpu")
    container = _find(docs, "Deployment", "selfcascade-worker")["spec"]["template"]["spec"][
        "containers"
    ][0]
    with socket.socket() as hung:  # accepts connections (backlog), never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        env = _env(REDIS_URL=f"redis://127.0.0.1:{hung.getsockname()[1]}/0")
        for kind in ("startup", "liveness"):
            started = time.monotonic()
            done = _run(container[f"{kind}Probe"]["exec"]["command"], env, name_file)
            elapsed = time.monotonic() - started
            assert done.returncode == (0 if kind == "liveness" else 1), done.stderr
            assert elapsed < container[f"{kind}Probe"]["timeoutSeconds"] - 2, elapsed


def test_probes_fail_without_a_name_or_a_redis_url(tmp_path: Path) -> None:
    commands = _probe_commands()
    done = _run(commands["liveness"], _env(REDIS_URL="redis://127.0.0.1:1/0"), tmp_path / "none")
    assert done.returncode == 1 and "no worker name" in done.stderr
    name_file = tmp_path / "name"
    name_file.write_text("w\n")
    done = _run(commands["liveness"], _env(), name_file)
    assert done.returncode == 1 and "REDIS_URL" in done.stderr


def test_main_rejects_unknown_probe_kinds(capsys: Any) -> None:
    assert health.main(["ready"]) == 2
    assert "usage" in capsys.readouterr().err
