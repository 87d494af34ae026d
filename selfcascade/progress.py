"""What a running generation reports, and how a caller stops it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Progress:
    """One finished denoising step. `fraction` counts UNet steps over the whole run."""

    stage: int  # 1-based
    stages: int
    step: int  # 1-based, within the stage
    steps: int  # steps this stage runs
    fraction: float  # 0..1 over all stages
    # The size this stage samples at (clients label progress with it without re-planning).
    width: int | None = None
    height: int | None = None


ProgressCallback = Callable[[Progress], None]


class CancelToken(Protocol):
    """Anything with `is_set()`: a `threading.Event`, or a worker's Redis-backed flag."""

    def is_set(self) -> bool: ...
