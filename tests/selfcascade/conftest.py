"""Tiny pipelines built from configs (random weights), once per test session."""

from __future__ import annotations

import pytest
from diffusers import (
    AnimateDiffPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    TextToVideoSDPipeline,
)
from diffusers.utils import logging as diffusers_logging

from selfcascade.tiny_models import (
    build_tiny_animatediff_pipeline,
    build_tiny_sd_pipeline,
    build_tiny_sdxl_pipeline,
    build_tiny_text_to_video_pipeline,
)


@pytest.fixture(scope="session", autouse=True)
def _quiet_diffusers() -> None:
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_sd() -> StableDiffusionPipeline:
    pipe = build_tiny_sd_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_sdxl() -> StableDiffusionXLPipeline:
    pipe = build_tiny_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_t2v() -> TextToVideoSDPipeline:
    pipe = build_tiny_text_to_video_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_animatediff() -> AnimateDiffPipeline:
    pipe = build_tiny_animatediff_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe
