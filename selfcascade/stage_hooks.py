"""The extension point of a re-noise stage: hooks instead of forks.

A `StageHook` is entered around the denoising of every stage after the first. It receives the
stage's description, including the pivot, and may install forward hooks on the UNet for the
duration of the stage. It must remove them on exit, also when the stage raises. The tuned
self-cascade (feature upsamplers) is one such hook.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from selfcascade.plan import StageSize

if TYPE_CHECKING:
    import torch
    from diffusers import UNet2DConditionModel

    from selfcascade.request import LRFeatureMode


@dataclass(frozen=True)
class StageRun:
    """A re-noise stage about to run."""

    index: int  # 1-based; always >= 2 for a re-noise stage
    stages: int
    size: StageSize
    previous_size: StageSize
    unet: UNet2DConditionModel
    # The previous stage's clean latent, as the pipeline returns it with output_type="latent"
    # (already multiplied by the VAE scaling factor, never again). Shape (B, C, h, w), or
    # (B, C, F, h, w) from the video engine.
    pivot_latents: torch.Tensor
    # The pivot upsampled to this stage's latent size, before re-noising. Shape (B, C, H, W), or
    # (B, C, F, H, W) from the video engine (every frame upsampled alone).
    upsampled_latents: torch.Tensor
    pivot_strength: float
    lr_features: LRFeatureMode


class StageHook(Protocol):
    def __call__(self, stage: StageRun) -> AbstractContextManager[None]: ...
