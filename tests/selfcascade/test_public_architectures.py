"""The public SD2.1-base / SDXL-base architectures the GPU benchmark builds, and the warm-up."""

from __future__ import annotations

import pytest
import torch

from selfcascade.pipeline import SelfCascadePipeline
from selfcascade.public_architectures import build_public_pipeline
from selfcascade.tiny_models import build_tiny_sd_pipeline
from selfcascade.warmup import warm_up
from tests.selfcascade.single_thread import single_thread_torch  # noqa: F401 (fixture)


def millions(module: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)


@pytest.mark.parametrize(
    ("architecture", "unet", "text", "native"),
    [("sd21-base", 865.9, [340.4], 512), ("sdxl-base", 2567.5, [123.1, 694.7], 1024)],
)
def test_public_architectures_have_the_published_sizes(
    architecture: str, unet: float, text: list[float], native: int
) -> None:
    # The meta device builds shapes only: nothing is allocated, so this runs in a second.
    pipe = build_public_pipeline(architecture, device="meta")  # type: ignore[arg-type]
    assert millions(pipe.unet) == unet
    encoders = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    assert [millions(e) for e in encoders if e is not None] == text
    assert pipe.unet.dtype == torch.float16
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == native


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build_public_pipeline("sd3", device="meta")  # type: ignore[arg-type]


@pytest.mark.usefixtures("single_thread_torch")
def test_warm_up_runs_both_stage_kinds_of_the_engine() -> None:
    engine = SelfCascadePipeline(build_tiny_sd_pipeline())
    engine.pipe.set_progress_bar_config(disable=True)
    calls = []
    handle = engine.pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        assert warm_up(engine, steps=2) > 0
    finally:
        handle.remove()
    assert len(calls) == 4  # 2 txt2img steps at native size + 2 re-noise steps at 2x
