"""A bad models file stops the API and the worker at start with one line naming the file and the
entry: what an operator reads in `docker compose logs`, not a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.live_stack import REPO

pytestmark = pytest.mark.integration


def start(
    entry_point: str, models: Path, redis_url: str, tmp_path: Path, **env_vars: str
) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFCASCADE_")}
    env.update(
        SELFCASCADE_REDIS_URL=redis_url,
        SELFCASCADE_MODELS_FILE=str(models),
        SELFCASCADE_DATA_DIR=str(tmp_path / "data"),
        PYTHONPATH=str(REPO),
        **env_vars,
    )
    return subprocess.run(
        [sys.executable, "-m", entry_point], env=env, cwd=tmp_path, capture_output=True,
        text=True, timeout=120, check=False,
    )


@pytest.mark.parametrize("entry_point", ["service.main", "worker.main"])
def test_a_bad_models_file_exits_with_one_line(
    tmp_path: Path, redis_url: str, entry_point: str
) -> None:
    models = tmp_path / "models.json"
    entry = {"name": "demo", "path": "x", "native_width": 64, "native_height": 64}
    models.write_text(json.dumps([{**entry, "upsampler": "demo.safetensors"}]))
    done = start(entry_point, models, redis_url, tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"models file {models}: entry 0 ('demo'): upsampler: unknown key"
    ], done.stderr


def test_a_worker_asked_for_a_model_the_file_lacks_exits_with_one_line(
    tmp_path: Path, redis_url: str, tiny_model_dir: Path
) -> None:
    models = tmp_path / "models.json"
    entry = {"path": str(tiny_model_dir), "native_width": 64, "native_height": 64}
    models.write_text(json.dumps([{"name": "a", **entry}, {"name": "b", **entry}]))
    done = start("worker.main", models, redis_url, tmp_path, SELFCASCADE_WORKER_MODELS="b, sdxl")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "SELFCASCADE_WORKER_MODELS names sdxl, not in the models file (it has a, b)"
    ], done.stderr


def test_a_model_the_worker_cannot_serve_exits_with_one_line(
    tmp_path: Path, redis_url: str, tiny_model_dir: Path
) -> None:
    # The file is valid; what it names is not: the API starts, the worker refuses.
    models = tmp_path / "models.json"
    entry = {"name": "m", "native_width": 64, "native_height": 64}
    for fields, message in [
        ({"path": str(tmp_path / "missing")}, "cannot serve the configured models: "),
        ({"path": str(tiny_model_dir), "produces": "video"}, "says it produces video"),
        ({"path": str(tiny_model_dir), "upsamplers": str(models)}, "corrupt or truncated"),
        # The API would admit requests by these, the worker run them by the UNet's own.
        ({"path": str(tiny_model_dir), "native_width": 128}, "UNet samples 64x64"),
        ({"path": str(tiny_model_dir), "size_multiple": 4}, "needs multiples of 8"),
    ]:
        models.write_text(json.dumps([{**entry, **fields}]))
        done = start("worker.main", models, redis_url, tmp_path)
        assert done.returncode == 1
        [line] = done.stderr.strip().splitlines()[-1:]
        assert line.startswith("cannot serve the configured models: ") and message in line, (
            done.stderr
        )
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "entry_point", ["service.main", "worker.main", "service.all_in_one", "service.webhook_worker"]
)
def test_bad_settings_exit_with_one_line_naming_each_variable(
    tmp_path: Path, entry_point: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFCASCADE_")}
    env.update(
        SELFCASCADE_AUTH_MODE="nope", SELFCASCADE_JOB_RETRIES="many", PYTHONPATH=str(REPO)
    )
    done = subprocess.run(
        [sys.executable, "-m", entry_point], env=env, cwd=tmp_path, capture_output=True,
        text=True, timeout=120, check=False,
    )
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("invalid settings: "), line
    assert "SELFCASCADE_AUTH_MODE: Input should be 'open' or 'keys'" in line
    assert "SELFCASCADE_JOB_RETRIES: Input should be a valid integer" in line
