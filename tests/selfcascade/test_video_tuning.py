"""Tuned self-cascade on video UNets (UNet3DConditionModel, UNetMotionModel): the injected LR
features are the UNet's own on the pivot, an untrained set changes nothing, and `tune` learns
from short clips (frame folders or video files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import AnimateDiffPipeline, UNetMotionModel
from PIL import Image

from selfcascade.checkpoint import load_upsamplers
from selfcascade.cli import main as cli_main
from selfcascade.errors import InvalidRequest
from selfcascade.request import GenerationRequest
from selfcascade.tiny_models import (
    build_tiny_animatediff_pipeline,
    save_tiny_text_to_video,
)
from selfcascade.tuned import TunedStageHook, inject_upsamplers, load_tuned_hook
from selfcascade.tuning import UPSAMPLERS_FILE, TuneConfig, tune
from selfcascade.tuning_clips import TuningClips
from selfcascade.upsamplers import FeatureUpsamplerSet
from selfcascade.video_pipeline import VideoSelfCascadePipeline
from tests.selfcascade.single_thread import single_thread_torch  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread_torch")

CROP = 128  # tiny models: native 64 px, scale 2


@pytest.fixture(params=["tiny_t2v", "tiny_animatediff"])
def pipe(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)


def randomised(upsamplers: FeatureUpsamplerSet) -> FeatureUpsamplerSet:
    """A set whose output is not zero (an untrained one adds exactly nothing)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in upsamplers.parameters():
            p.normal_(std=0.1)
    return upsamplers


def frames_array(frames: list[Any]) -> np.ndarray:
    return np.stack([np.asarray(frame) for frame in frames])


def text_states(pipe: Any, batch: int, frames: int) -> torch.Tensor:
    text = torch.randn((batch, 77, 32), generator=torch.Generator().manual_seed(2))
    if isinstance(pipe.unet, UNetMotionModel):  # AnimateDiff's UNet takes one per frame
        text = text.repeat_interleave(frames, dim=0)
    return text


def test_lr_features_are_the_unets_own_features_of_the_pivot(pipe: Any) -> None:
    unet = pipe.unet
    generator = torch.Generator().manual_seed(0)
    pivot = torch.randn((1, 4, 3, 8, 8), generator=generator)  # (B, C, F, h, w)
    sample = torch.randn((2, 4, 3, 16, 16), generator=generator)  # CFG batch, 2x the size
    t = torch.tensor(500)
    upsamplers = FeatureUpsamplerSet.for_unet(unet.config)

    with torch.no_grad():
        # per_stage keeps the features of its first call; per_step computes the same ones.
        with inject_upsamplers(unet, upsamplers, pivot, "per_stage") as injection:
            unet(sample, t, encoder_hidden_states=text_states(pipe, 2, 3))
            injected = dict(injection._features)

        own: dict[str, torch.Tensor] = {}
        blocks = {"down_0": unet.down_blocks[0], "down_1": unet.down_blocks[1]}
        blocks["mid"] = unet.mid_block
        handles = [
            block.register_forward_hook(
                lambda _m, _a, out, name=name: own.__setitem__(
                    name, out[0] if isinstance(out, tuple) else out
                )
            )
            for name, block in blocks.items()
        ]
        try:
            unet(pivot.repeat(2, 1, 1, 1, 1), t, encoder_hidden_states=text_states(pipe, 2, 3))
        finally:
            for handle in handles:
                handle.remove()

    for name in blocks:
        assert injected[name].shape == own[name].shape  # frames folded: (2*3, C_n, h_n, w_n)
        torch.testing.assert_close(injected[name], own[name], rtol=1e-5, atol=1e-6)
    assert not unet._forward_hooks and not unet._forward_pre_hooks


def test_untrained_upsamplers_change_nothing_and_trained_ones_do(pipe: Any) -> None:
    engine = VideoSelfCascadePipeline(pipe)
    req = GenerationRequest(prompt="a ball", width=128, height=128, steps=4, num_frames=3, seed=4)
    base = frames_array(engine.generate(req).frames)
    zero = FeatureUpsamplerSet.for_unet(pipe.unet.config)
    untrained = frames_array(engine.generate(req, stage_hooks=[TunedStageHook(zero)]).frames)
    trained_set = randomised(FeatureUpsamplerSet.for_unet(pipe.unet.config))
    trained = engine.generate(req, stage_hooks=[TunedStageHook(trained_set)])
    assert np.array_equal(base, untrained)
    assert not np.array_equal(base, frames_array(trained.frames))
    assert len(trained.frames) == 3 and trained.frames[0].size == (128, 128)
    assert not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks


def moving_square_clip(folder: Path, frames: int = 4, size: int = 136) -> Path:
    """A square drifting right over a gradient: structure that moves from frame to frame."""
    folder.mkdir(parents=True)
    y, x = np.mgrid[0:size, 0:size]
    for i in range(frames):
        rgb = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 80)], -1)
        rgb[40:80, 20 + 8 * i : 60 + 8 * i] = (250, 40, 40)
        Image.fromarray(rgb.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_tune_on_frame_folders_saves_upsamplers_that_serve(tmp_path: Path) -> None:
    pipe = build_tiny_animatediff_pipeline(seed=0)  # its own: tune freezes the modules it gets
    pipe.set_progress_bar_config(disable=True)
    data = tmp_path / "clips"
    moving_square_clip(data / "walk")
    (data / "walk.txt").write_text("a red square moving right")
    moving_square_clip(data / "run", frames=3)
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}

    config = TuneConfig(
        data_dir=data, out_dir=tmp_path / "out", steps=2, clip_frames=2, save_every=1, lr=1e-3
    )
    result = tune(pipe, config)

    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert result.checkpoint == tmp_path / "out" / UPSAMPLERS_FILE
    assert any(p.abs().sum() > 0 for p in result.upsamplers.parameters())
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(value, unet_before[name]), name
    assert load_upsamplers(result.checkpoint, pipe.unet).scale == 2

    hook = load_tuned_hook(result.checkpoint, pipe)
    req = GenerationRequest(prompt="a ball", width=128, height=128, steps=2, num_frames=2)
    video = VideoSelfCascadePipeline(pipe).generate(req, stage_hooks=[hook])
    assert len(video.frames) == 2 and video.frames[0].size == (128, 128)


def test_clips_sample_windows_of_consecutive_frames_with_one_crop(tmp_path: Path) -> None:
    moving_square_clip(tmp_path / "walk", frames=4)
    clips = TuningClips.scan(tmp_path, crop_size=CROP, frames=3)
    assert [c.frame_count for c in clips.clips] == [4]
    pixels, captions = clips.sample(2, torch.Generator().manual_seed(0))
    assert pixels.shape == (2, 3, 3, CROP, CROP) and captions == ["", ""]
    assert pixels.min() >= -1 and pixels.max() <= 1
    # The square moves right by 8 px a frame in every window: consecutive, same crop.
    red = (pixels[0, :, 0] > 0.9) & (pixels[0, :, 1] < -0.6)  # (F, S, S)
    lefts = [int(torch.nonzero(frame.any(0))[0]) for frame in red]
    assert lefts[1] - lefts[0] == 8 and lefts[2] - lefts[1] == 8


def test_clips_read_video_files(tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = CROP
        stream.pix_fmt = "yuv420p"
        for i in range(3):
            rgb = np.zeros((CROP, CROP, 3), np.uint8)
            rgb[:, 10 * i : 10 * i + 30] = 255
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    (tmp_path / "clip.txt").write_text("a white bar")
    clips = TuningClips.scan(tmp_path, crop_size=CROP, frames=2)
    assert [(c.frame_count, c.width, c.caption) for c in clips.clips] == [(3, CROP, "a white bar")]
    pixels, _ = clips.sample(1, torch.Generator().manual_seed(0))
    assert pixels.shape == (1, 2, 3, CROP, CROP)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: None, "no clips"),
        (lambda d: moving_square_clip(d / "short", frames=1), "fewer than"),
        (lambda d: moving_square_clip(d / "small", size=100), "smaller than"),
        (lambda d: (d / "empty").mkdir(), "holds no frames"),
        (lambda d: (d / "broken.mp4").write_bytes(b"not a video"), "not a readable video"),
    ],
)
def test_bad_clip_folders_are_refused_by_name(tmp_path: Path, make: Any, message: str) -> None:
    if message == "not a readable video":
        pytest.importorskip("av")
    make(tmp_path)
    with pytest.raises(InvalidRequest, match=message) as caught:
        TuningClips.scan(tmp_path, crop_size=CROP, frames=2)
    assert caught.value.param == "data"


def test_cli_tune_accepts_a_folder_of_clips(tmp_path: Path) -> None:
    model = save_tiny_text_to_video(tmp_path / "model")
    moving_square_clip(tmp_path / "clips" / "walk", frames=3)
    out = tmp_path / "out"
    code = cli_main(
        [
            "tune", "--model", str(model), "--data", str(tmp_path / "clips"), "--steps", "1",
            "--clip-frames", "2", "--out", str(out), "--device", "cpu",
        ]
    )  # fmt: skip
    assert code == 0
    assert (out / UPSAMPLERS_FILE).is_file()


def test_animatediff_pipeline_merges_the_adapter_into_a_motion_unet(tiny_animatediff: Any) -> None:
    # The tuned hooks and upsampler levels assume the merged UNet, not a 2-D one plus adapter.
    assert isinstance(tiny_animatediff, AnimateDiffPipeline)
    assert isinstance(tiny_animatediff.unet, UNetMotionModel)
