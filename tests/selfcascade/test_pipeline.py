"""The engine against stock diffusers, on tiny pipelines built from configs (CPU, fp32)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

from selfcascade.errors import GenerationCancelled, InvalidRequest
from selfcascade.pipeline import SelfCascadePipeline, renoise_and_denoise
from selfcascade.plan import StageSize
from selfcascade.progress import Progress
from selfcascade.request import GenerationRequest

PROMPT = "a red circle and a blue square"


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image)


def request(**overrides: Any) -> GenerationRequest:
    values: dict[str, Any] = {"prompt": PROMPT, "width": 64, "height": 64, "steps": 6, "seed": 7}
    values.update(overrides)
    return GenerationRequest(**values)


def stock(pipe: Any, cls: type | None = None) -> Any:
    """The stock diffusers pipeline a user would run, with DDIM like the engine's default."""
    cls = cls or type(pipe)
    built = cls.from_pipe(pipe, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    built.set_progress_bar_config(disable=True)
    return built


@pytest.fixture(params=["tiny_sd", "tiny_sdxl"])
def pipe(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)


def test_single_stage_is_bit_identical_to_stock_text_to_image(pipe: Any) -> None:
    result = SelfCascadePipeline(pipe).generate(request())
    expected = stock(pipe)(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=6,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(7),
    ).images[0]
    assert result.stages == [StageSize(64, 64)]
    assert np.array_equal(pixels(result.images[0]), pixels(expected))


def test_renoise_stage_is_bit_identical_to_stock_img2img(pipe: Any) -> None:
    img2img_cls = (
        StableDiffusionXLImg2ImgPipeline
        if isinstance(pipe, StableDiffusionXLPipeline)
        else StableDiffusionImg2ImgPipeline
    )
    latents = torch.randn((1, 4, 48, 48), generator=torch.Generator().manual_seed(1))
    ours = renoise_and_denoise(
        stock(pipe, img2img_cls),
        latents,
        strength=0.7,
        steps=10,
        prompt=PROMPT,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    )
    theirs = stock(pipe, img2img_cls)(
        prompt=PROMPT,
        image=latents,
        strength=0.7,
        num_inference_steps=10,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images
    assert ours.shape == (1, 96, 96, 3)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize(("width", "height"), [(128, 128), (256, 256), (192, 128), (96, 160)])
def test_multi_stage_runs_return_exactly_the_requested_size(
    pipe: Any, width: int, height: int
) -> None:
    engine = SelfCascadePipeline(pipe)
    result = engine.generate(request(width=width, height=height, steps=4))
    assert result.images[0].size == (width, height)
    assert result.stages[-1] == StageSize(width, height)
    assert len(result.stages) >= 2
    assert len(result.stage_seconds) == len(result.stages)


def test_three_stage_run_counts_unet_evaluations(tiny_sd: Any) -> None:
    result = SelfCascadePipeline(tiny_sd).generate(request(width=256, height=256, steps=10))
    assert [s.width for s in result.stages] == [64, 128, 256]
    # stage 1: all 10 steps; each re-noise stage int(10 * 0.7) = 7 steps; CFG is one batched call
    assert result.stage_steps == [10, 7, 7]
    assert result.unet_evaluations == 24


def test_same_seed_same_image_and_other_seed_other_image(tiny_sd: Any) -> None:
    engine = SelfCascadePipeline(tiny_sd)
    a = engine.generate(request(width=128, height=96, seed=11)).images[0]
    b = engine.generate(request(width=128, height=96, seed=11)).images[0]
    c = engine.generate(request(width=128, height=96, seed=12)).images[0]
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_direct_method_samples_once_at_the_target_size(tiny_sd: Any) -> None:
    result = SelfCascadePipeline(tiny_sd).generate(request(width=128, height=128, method="direct"))
    assert result.stages == [StageSize(128, 128)]
    assert result.unet_evaluations == 6
    assert result.images[0].size == (128, 128)


def test_cascade_differs_from_direct_at_the_same_size(tiny_sd: Any) -> None:
    engine = SelfCascadePipeline(tiny_sd)
    cascade = engine.generate(request(width=128, height=128)).images[0]
    direct = engine.generate(request(width=128, height=128, method="direct")).images[0]
    assert not np.array_equal(pixels(cascade), pixels(direct))


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++", "euler"])
@pytest.mark.parametrize("upsample_mode", ["bilinear", "bicubic"])
def test_schedulers_and_upsample_modes(tiny_sd: Any, scheduler: str, upsample_mode: str) -> None:
    result = SelfCascadePipeline(tiny_sd).generate(
        request(width=128, height=128, scheduler=scheduler, upsample_mode=upsample_mode)
    )
    image = pixels(result.images[0])
    assert image.shape == (128, 128, 3)
    assert image.std() > 0  # not a blank or NaN-clipped image


def test_progress_is_monotonic_and_ends_at_one(tiny_sd: Any) -> None:
    seen: list[Progress] = []
    SelfCascadePipeline(tiny_sd).generate(request(width=256, height=256), on_progress=seen.append)
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions)
    assert fractions[-1] == pytest.approx(1.0)
    assert {p.stage for p in seen} == {1, 2, 3}
    assert all(p.stages == 3 and 1 <= p.step <= p.steps for p in seen)
    assert len(seen) == 6 + 4 + 4  # int(6 * 0.7) = 4 steps per re-noise stage
    sizes = {p.stage: (p.width, p.height) for p in seen}  # each stage says its own size
    assert sizes == {1: (64, 64), 2: (128, 128), 3: (256, 256)}


def test_cancel_stops_within_one_step(tiny_sd: Any) -> None:
    cancel = threading.Event()
    seen: list[Progress] = []

    def on_progress(p: Progress) -> None:
        seen.append(p)
        if p.stage == 2 and p.step == 2:
            cancel.set()

    engine = SelfCascadePipeline(tiny_sd)
    with pytest.raises(GenerationCancelled) as info:
        engine.generate(request(width=256, height=256), on_progress=on_progress, cancel=cancel)
    assert (info.value.stage, info.value.step) == (2, 2)
    assert (seen[-1].stage, seen[-1].step) == (2, 2)


def test_cancel_before_start_runs_no_step(tiny_sd: Any) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(GenerationCancelled):
        SelfCascadePipeline(tiny_sd).generate(request(), cancel=cancel)


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"width": 100}, "width"),
        ({"height": 4}, "height"),
        ({"steps": 0}, "steps"),
        ({"pivot_strength": 0.0}, "pivot_strength"),
        ({"pivot_strength": 1.01}, "pivot_strength"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        # one step at strength 0.7 leaves no step for the re-noise stage
        ({"steps": 1, "width": 128}, "pivot_strength"),
    ],
)
def test_invalid_requests_raise_before_any_step(
    tiny_sd: Any, overrides: dict, param: str
) -> None:
    seen: list[Progress] = []
    with pytest.raises(InvalidRequest) as info:
        SelfCascadePipeline(tiny_sd).generate(request(**overrides), on_progress=seen.append)
    assert info.value.param == param
    assert seen == []


def test_tiled_decode_is_switched_on_above_the_threshold_and_off_after(tiny_sd: Any) -> None:
    engine = SelfCascadePipeline(tiny_sd, tiled_decode_above_pixels=96 * 96)
    tiling_during_decode: list[bool] = []
    vae = tiny_sd.vae
    handle = vae.decoder.register_forward_pre_hook(
        lambda *_: tiling_during_decode.append(vae.use_tiling)
    )
    try:
        engine.generate(request(width=128, height=128, steps=2, pivot_strength=1.0))
        engine.generate(request(width=64, height=64, steps=2))
    finally:
        handle.remove()
    assert tiling_during_decode[0] is True
    assert tiling_during_decode[-1] is False
    assert vae.use_tiling is False


def test_sdxl_size_conditioning_follows_each_stage(tiny_sdxl: Any) -> None:
    seen_time_ids: list[list[float]] = []

    def capture(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        seen_time_ids.append(kwargs["added_cond_kwargs"]["time_ids"][-1].tolist())

    handle = tiny_sdxl.unet.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        engine = SelfCascadePipeline(tiny_sdxl)
        req = request(width=128, height=96, steps=2)
        engine.generate(req)
    finally:
        handle.remove()
    base = engine.plan(req)[0]
    assert base != StageSize(128, 96)
    # time_ids = original (h, w) + crop (0, 0) + target (h, w), per stage
    assert seen_time_ids[0] == [base.height, base.width, 0, 0, base.height, base.width]
    assert seen_time_ids[-1] == [96.0, 128.0, 0.0, 0.0, 96.0, 128.0]


def test_building_the_engine_never_recasts_the_resident_modules() -> None:
    from selfcascade.tiny_models import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline().to(torch.bfloat16)
    SelfCascadePipeline(pipe)
    assert pipe.unet.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.bfloat16


def test_an_interrupted_sdxl_decode_leaves_the_resident_vae_in_its_dtype() -> None:
    from selfcascade.tiny_models import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline().to(torch.float16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.force_upcast  # diffusers upcasts this VAE to fp32 to decode

    def out_of_memory(*_: Any) -> None:
        assert pipe.vae.dtype == torch.float32  # the upcast happened
        raise RuntimeError("simulated out of memory in the decode")

    handle = pipe.vae.decoder.register_forward_pre_hook(out_of_memory)
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            SelfCascadePipeline(pipe).generate(request(steps=1, guidance_scale=1.0))
    finally:
        handle.remove()
    assert pipe.vae.dtype == torch.float16
