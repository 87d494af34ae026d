"""The Dockerfiles, their build context and the Makefile's system tools, checked without Docker."""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import tomllib
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from selfcascade.demo import card as demo_card
from tests.deploy.test_manifests import ROOT, _compose_config, _mounts, _tool

DOCKERFILES = ["api.Dockerfile", "worker.Dockerfile"]


def _lines(dockerfile: str) -> list[str]:
    """Instructions with their continuation lines joined, comments dropped."""
    text = (ROOT / "docker" / dockerfile).read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [line.strip() for line in "\n".join(lines).replace("\\\n", " ").splitlines() if line]


def _torch_floor(requirements: list[str]) -> Version | None:
    floors = [
        Version(spec.version)
        for req in map(Requirement, requirements)
        if req.name == "torch"
        for spec in req.specifier
        if spec.operator == ">="
    ]
    return max(floors, default=None)


def test_worker_image_torch_satisfies_transformers_and_diffusers() -> None:
    """transformers 5 and diffusers 0.42 disable torch < 2.6: the worker then loads no model."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ours = _torch_floor(project["optional-dependencies"]["worker"])
    assert ours is not None and ours >= Version("2.6")
    floors = [Version("2.6")]
    for package in ("transformers", "diffusers"):
        try:
            floor = _torch_floor(
                [r.split(";")[0] for r in requires(package) or [] if "torch" in r]
            )
        except PackageNotFoundError:  # pragma: no cover - the dev install has both
            continue
        if floor is not None:
            floors.append(floor)
    # pip keeps the base image's torch only when it satisfies our floor, so our floor must cover
    # what the libraries need, and the base image must ship at least that.
    assert ours >= max(floors)
    [arg] = [line for line in _lines("worker.Dockerfile") if line.startswith("ARG BASE_IMAGE=")]
    match = re.fullmatch(
        r"ARG BASE_IMAGE=pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", arg
    )
    assert match, arg
    assert Version(match.group(1)) >= ours


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_create_their_writable_folders_for_the_app_user(dockerfile: str) -> None:
    """A volume mounted on a path the image lacks is created root-owned: uid 10001 can't write."""
    lines = _lines(dockerfile)
    user_at = lines.index("USER app")
    before = " ".join(lines[:user_at])
    mkdir = re.search(r"mkdir -p ([^&]+)", before)
    chown = re.search(r"chown app ([^&]+)", before)
    assert mkdir and chown, dockerfile
    assert "/data" in mkdir.group(1).split() and "/data" in chown.group(1).split()
    assert "SELFCASCADE_DATA_DIR=/data" in before


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_volumes_land_on_folders_the_images_made_writable(profile: str) -> None:
    config = _compose_config(profile)
    for name, service in config["services"].items():
        build = service.get("build")
        if not build:
            continue
        dockerfile = Path(build["dockerfile"]).name
        lines = " ".join(_lines(dockerfile))
        for target, (_source, read_only) in _mounts(service).items():
            if read_only:
                continue
            assert "chown app" in lines and target in lines, (name, target)
            assert service["environment"].get("SELFCASCADE_DATA_DIR", target) == target


def _dockerignore() -> list[str]:
    text = (ROOT / ".dockerignore").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.removeprefix("**/"))
               for p in prefixes):
            ignored = not negate
    return ignored


def test_build_context_leaves_out_the_venv_data_and_git_but_keeps_what_images_copy() -> None:
    patterns = _dockerignore()
    for path in (".venv", ".venv/lib/python3.11", "data", "data/models/tiny", ".git"):
        assert _ignored(path, patterns), path
    copied = {"models", "models/demo/model_index.json", str(demo_card.UPSAMPLERS[0])}
    for dockerfile in DOCKERFILES:
        for line in _lines(dockerfile):
            if line.startswith("COPY "):
                sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
                copied |= {s for s in sources if "$" not in s}
        for line in _lines(dockerfile):  # ARG defaults of COPY sources (MODELS=docker/no-model)
            if line.startswith("ARG MODELS="):
                copied.add(line.split("=", 1)[1])
    for path in sorted(copied):
        assert not _ignored(path.rstrip("/"), patterns), path
        assert (ROOT / path).exists(), path


def test_system_tools_installs_each_package_on_its_own(tmp_path: Path) -> None:
    """One package apt lacks (stock Debian has no kubectl) must not block the others."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    (bin_dir / "id").write_text("#!/bin/sh\necho 0\n")
    # Like apt-get: a package it cannot find refuses the whole command, installing nothing.
    (bin_dir / "apt-get").write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        '[ "$1" = update ] && exit 0\n'
        'case " $* " in *" nokube "*) echo "E: Unable to locate package nokube" >&2; exit 100;; '
        "esac\n"
        'for pkg; do case "$pkg" in -*|install) ;; *) printf "#!/bin/sh\\n" > '
        '"$(dirname "$0")/$pkg"; chmod +x "$(dirname "$0")/$pkg";; esac; done\n'
    )
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    tools = "fakecompose:fakecompose nokubectl:nokube fakechrome:fakechrome"
    done = subprocess.run(
        [_tool("make"), "-s", "system-tools", f"SYSTEM_TOOLS={tools}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )
    assert done.returncode == 0, done.stderr
    installs = [line for line in log.read_text().splitlines() if line.startswith("install")]
    assert len(installs) == 3, installs
    assert (bin_dir / "fakecompose").exists() and (bin_dir / "fakechrome").exists()
    assert "could not install nokube" in done.stdout
    assert "tests that need nokubectl will skip" in done.stdout
