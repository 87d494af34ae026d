"""The API image stays small: importing and building the app never pulls in torch."""

from __future__ import annotations

import subprocess
import sys

from tests.live_stack import REPO

PROGRAM = """
import sys
import service.app, service.main, service.all_in_one
from contract.settings import Settings
service.app.create_app(Settings(redis_url="redis://127.0.0.1:1/0"))
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "worker") if m in sys.modules)
assert not heavy, heavy
# Of the algorithm package the API reads only plain-Python defaults: the paper's pivot strength
# (selfcascade.request, with its error type), the encoders' limits, the demo model's card, the
# rule for weight variants' names, and the package's own log filters (its __init__, logging only).
algorithm = sorted(m for m in sys.modules if m.split(".")[0] == "selfcascade")
assert algorithm == [
    "selfcascade", "selfcascade.demo", "selfcascade.demo.card", "selfcascade.errors",
    "selfcascade.library_logs", "selfcascade.output_formats", "selfcascade.request",
    "selfcascade.weight_variants",
], algorithm
"""


def test_service_never_imports_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
