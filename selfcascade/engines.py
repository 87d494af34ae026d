"""Which self-cascade engine serves a loaded pipeline: images for SD/SDXL, videos for
text-to-video (UNet3DConditionModel) and AnimateDiff pipelines."""

from __future__ import annotations

from typing import Any

from diffusers import AnimateDiffPipeline, TextToVideoSDPipeline

from selfcascade.cascade_engine import CascadeEngine
from selfcascade.pipeline import SelfCascadePipeline
from selfcascade.video_pipeline import VideoSelfCascadePipeline


def engine_for(pipe: Any) -> CascadeEngine:
    """The engine for `pipe`; `ModelLoadError` for a pipeline neither engine supports.

    `engine.produces_video` tells the caller whether results carry `frames` or `images`.
    """
    if isinstance(pipe, TextToVideoSDPipeline | AnimateDiffPipeline):
        return VideoSelfCascadePipeline(pipe)
    return SelfCascadePipeline(pipe)
