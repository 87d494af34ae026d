"""Every SELFCASCADE_* variable the docs and the deploy configs name is one the code reads: a
typo in a compose file or a ConfigMap is otherwise ignored without a word, and the service runs
on a default its operator thinks they changed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from contract.settings import Settings
from selfcascade.client import API_KEY_ENV, SERVER_ENV
from tests.live_stack import REPO

# The client's own (selfcascade.client), not the service's settings.
CLIENT_VARIABLES = {SERVER_ENV, API_KEY_ENV}
SETTINGS_VARIABLES = {f"SELFCASCADE_{name.upper()}" for name in Settings.model_fields}
FULL_NAME = re.compile(r"\bSELFCASCADE_[A-Z0-9_]*[A-Z0-9]\b")
# The README's shorthand after a first full name: `_MAX_PIXELS` for SELFCASCADE_MAX_PIXELS.
SHORT_NAME = re.compile(r"`_([A-Z][A-Z0-9_]*[A-Z0-9])`")


def files() -> list[Path]:
    found = [REPO / "README.md", REPO / "docker-compose.yml", REPO / "models" / "README.md"]
    found += sorted((REPO / "deploy").rglob("*.yaml")) + sorted((REPO / "deploy").rglob("*.env"))
    found += sorted((REPO / "docker").glob("*"))
    found += sorted((REPO / "bench").glob("*.md"))
    return [path for path in found if path.is_file()]


@pytest.mark.parametrize("path", files(), ids=lambda path: str(path.relative_to(REPO)))
def test_each_variable_named_is_read_by_the_code(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    named = set(FULL_NAME.findall(text))
    named |= {f"SELFCASCADE_{short}" for short in SHORT_NAME.findall(text)}
    unknown = sorted(named - SETTINGS_VARIABLES - CLIENT_VARIABLES)
    assert not unknown, f"{path.name} names variables no code reads: {unknown}"


def test_the_check_sees_the_names() -> None:
    # Guards the patterns themselves: a regex that matched nothing would pass every file.
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "SELFCASCADE_MAX_PIXELS" in SETTINGS_VARIABLES
    assert "MAX_PIXELS" in SHORT_NAME.findall(readme)
    assert "SELFCASCADE_WORKER_MODELS" in FULL_NAME.findall(readme)
