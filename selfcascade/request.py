"""A generation request as the engine sees it: plain values, validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from selfcascade.errors import InvalidRequest

Method = Literal["self_cascade", "direct"]
UpsampleMode = Literal["bilinear", "bicubic"]
SchedulerName = Literal["ddim", "dpmsolver++", "euler"]
LRFeatureMode = Literal["per_step", "per_stage"]

# The same choices as tuples, for argparse and the checks below.
METHODS: tuple[str, ...] = get_args(Method)
UPSAMPLE_MODES: tuple[str, ...] = get_args(UpsampleMode)
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)
LR_FEATURE_MODES: tuple[str, ...] = get_args(LRFeatureMode)

MIN_SIDE = 8
# K / T: the paper's pivot timestep, K = 700 of T = 1000.
PAPER_PIVOT_STRENGTH = 0.7
MAX_STEPS = 1000
MAX_SEED = 2**32 - 1
# Frames of one video request. Every frame is denoised in each UNet call (frames are folded into
# the batch), so memory and time grow linearly with it; 64 covers AnimateDiff's longest
# motion modules (32 positions) twice over.
MAX_FRAMES = 64


@dataclass(frozen=True)
class GenerationRequest:
    """Paper defaults: 50 DDIM steps, pivot strength 0.7 (K = 700 of T = 1000)."""

    prompt: str
    width: int
    height: int
    negative_prompt: str | None = None
    steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    pivot_strength: float = PAPER_PIVOT_STRENGTH
    upsample_mode: UpsampleMode = "bilinear"
    scheduler: SchedulerName = "ddim"
    method: Method = "self_cascade"
    # Tuned mode only: recompute the pivot's features every step (official code) or once a stage.
    lr_features: LRFeatureMode = "per_step"
    # Video models only: frames of the clip. None means an image request; the video engine then
    # uses its default (`selfcascade.video_pipeline.DEFAULT_FRAMES`).
    num_frames: int | None = None

    def validate(self, size_multiple: int) -> None:
        """Raise `InvalidRequest` naming the first bad parameter; `size_multiple` is the VAE's."""
        if not isinstance(self.prompt, str):
            raise InvalidRequest("prompt", "must be a string")
        for name, value in (("width", self.width), ("height", self.height)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidRequest(name, f"must be an integer, got {value!r}")
            if value < MIN_SIDE:
                raise InvalidRequest(name, f"must be at least {MIN_SIDE} px, got {value}")
            if value % size_multiple:
                raise InvalidRequest(
                    name, f"must be a multiple of {size_multiple} px for this model, got {value}"
                )
        if not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise InvalidRequest("steps", f"must be an integer in 1..{MAX_STEPS}, got {self.steps}")
        if not _finite(self.guidance_scale) or self.guidance_scale < 0:
            raise InvalidRequest(
                "guidance_scale", f"must be a finite number >= 0, got {self.guidance_scale}"
            )
        if not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise InvalidRequest("seed", f"must be an integer in 0..{MAX_SEED}, got {self.seed}")
        if not _finite(self.pivot_strength) or not 0 < self.pivot_strength <= 1:
            raise InvalidRequest(
                "pivot_strength", f"must be in (0, 1], got {self.pivot_strength}"
            )
        if self.num_frames is not None and (
            not isinstance(self.num_frames, int)
            or isinstance(self.num_frames, bool)
            or not 1 <= self.num_frames <= MAX_FRAMES
        ):
            raise InvalidRequest(
                "num_frames", f"must be an integer in 1..{MAX_FRAMES}, got {self.num_frames!r}"
            )
        _check_choice("upsample_mode", self.upsample_mode, UPSAMPLE_MODES)
        _check_choice("scheduler", self.scheduler, SCHEDULERS)
        _check_choice("method", self.method, METHODS)
        _check_choice("lr_features", self.lr_features, LR_FEATURE_MODES)


def pixel_budget_problem(width: int, height: int, max_pixels: int) -> tuple[str, str] | None:
    """(param, message) when a width x height image is over `max_pixels`, named by its longer
    side, as the API and the CLI refuse it; None when it fits."""
    if width * height <= max_pixels:
        return None
    return (
        "width" if width >= height else "height",
        f"{width}x{height} exceeds the pixel budget of {max_pixels} pixels",
    )


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_choice(param: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidRequest(param, f"must be one of {', '.join(choices)}; got {value!r}")
