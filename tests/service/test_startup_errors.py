"""A bad models file stops the API and the worker at start with one line naming the file and the
entry: what an operator reads in `docker compose logs`, not a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.live_stack import REPO

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("entry_point", ["service.main", "worker.main"])
def test_a_bad_models_file_exits_with_one_line(
    tmp_path: Path, redis_url: str, entry_point: str
) -> None:
    models = tmp_path / "models.json"
    entry = {"name": "demo", "path": "x", "native_width": 64, "native_height": 64}
    models.write_text(json.dumps([{**entry, "upsampler": "demo.safetensors"}]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFCASCADE_")}
    env.update(
        SELFCASCADE_REDIS_URL=redis_url,
        SELFCASCADE_MODELS_FILE=str(models),
        SELFCASCADE_DATA_DIR=str(tmp_path / "data"),
        PYTHONPATH=str(REPO),
    )
    done = subprocess.run(
        [sys.executable, "-m", entry_point], env=env, cwd=tmp_path, capture_output=True,
        text=True, timeout=120, check=False,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"models file {models}: entry 0 ('demo'): upsampler: unknown key"
    ], done.stderr
