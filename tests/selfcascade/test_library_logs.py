"""The two library warnings every model load printed are dropped; everything else still logs."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import selfcascade  # noqa: F401  (installs the filters)

CASTS = "diffusers.models.modeling_utils"


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def lines_logged_by(name: str) -> Iterator[list[str]]:
    """What `name` emits at warning level past its filters: heard on the logger itself, since
    diffusers' loggers do not propagate to the root (where caplog listens), and at its own level,
    since the tests' conftest quiets diffusers to errors."""
    logger, kept = logging.getLogger(name), _Kept()
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(kept)
    try:
        yield kept.lines
    finally:
        logger.removeHandler(kept)
        logger.setLevel(level)


def test_importing_the_engine_prints_nothing() -> None:
    # Was two "[transformers] `CLIPImageProcessor` requires torchvision" lines on every start.
    done = subprocess.run(
        [sys.executable, "-c", "import selfcascade.loading, selfcascade.pipeline"],
        capture_output=True, text=True, check=True,
    )
    assert done.stderr == ""


def test_building_an_engine_logs_no_empty_float32_warning() -> None:
    from selfcascade.pipeline import SelfCascadePipeline
    from selfcascade.tiny_models import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline()
    with lines_logged_by(CASTS) as lines:
        SelfCascadePipeline(pipe)  # its stage pipelines "cast" the shared modules (was 4 lines)
    assert lines == []


def test_other_lines_of_those_loggers_still_pass() -> None:
    with lines_logged_by(CASTS) as lines:
        logging.getLogger(CASTS).warning("modules that should be kept in float32: [].")
        logging.getLogger(CASTS).warning("modules that should be kept in float32: ['wo'].")
    assert lines == ["modules that should be kept in float32: ['wo']."]
