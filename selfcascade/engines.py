"""Which self-cascade engine serves a loaded pipeline: images for SD/SDXL, videos for
text-to-video (UNet3DConditionModel) and AnimateDiff pipelines."""

from __future__ import annotations

from typing import Any

from diffusers import AnimateDiffPipeline, TextToVideoSDPipeline

from selfcascade.cascade_engine import CascadeEngine
from selfcascade.cuda_graphs import DEFAULT_CUDA_GRAPH_MAX_PIXELS
from selfcascade.pipeline import SelfCascadePipeline
from selfcascade.video_pipeline import VideoSelfCascadePipeline


def engine_for(
    pipe: Any,
    *,
    cuda_graph_max_pixels: int | None = DEFAULT_CUDA_GRAPH_MAX_PIXELS,
    compile_backend: str | None = None,
) -> CascadeEngine:
    """The engine for `pipe`; `ModelLoadError` for a pipeline neither engine supports.

    `engine.produces_video` tells the caller whether results carry `frames` or `images`.
    Image stages up to `cuda_graph_max_pixels` replay CUDA graphs on a GPU (None: never);
    with `compile_backend`, image stages of the sizes the warm-up ran run `torch.compile`d
    (video engines run uncompiled).
    """
    if isinstance(pipe, TextToVideoSDPipeline | AnimateDiffPipeline):
        return VideoSelfCascadePipeline(pipe)
    return SelfCascadePipeline(
        pipe, cuda_graph_max_pixels=cuda_graph_max_pixels, compile_backend=compile_backend
    )
