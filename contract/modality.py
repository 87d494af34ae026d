"""Whether a model folder holds an image or a video pipeline, read without importing diffusers.

The API validates requests per modality (num_frames only for video, mp4 only for video) but
never loads a model, so it reads the class name diffusers wrote into model_index.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

Modality = Literal["image", "video"]

# diffusers' video pipelines: TextToVideoSDPipeline, AnimateDiffPipeline, CogVideoXPipeline,
# StableVideoDiffusionPipeline, ... Every one of them names "Video" or is an AnimateDiff.
_VIDEO_CLASS_MARKERS = ("Video", "AnimateDiff")


def detect_modality(path: str) -> Modality:
    """"video" for a local folder holding a video pipeline; "image" otherwise (hub ids too)."""
    try:
        index = json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, ValueError):
        return "image"
    class_name = str(index.get("_class_name", "")) if isinstance(index, dict) else ""
    return "video" if any(m in class_name for m in _VIDEO_CLASS_MARKERS) else "image"
