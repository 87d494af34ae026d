"""The video engine against stock diffusers and a hand-written re-noise stage, on tiny
text-to-video (UNet3DConditionModel) and AnimateDiff (UNetMotionModel) pipelines (CPU, fp32)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AnimateDiffPipeline, DDIMScheduler, TextToVideoSDPipeline

from selfcascade.engines import engine_for
from selfcascade.errors import GenerationCancelled, InvalidRequest
from selfcascade.loading import load_pipeline
from selfcascade.pipeline import SelfCascadePipeline
from selfcascade.plan import StageSize
from selfcascade.progress import Progress
from selfcascade.request import MAX_FRAMES, GenerationRequest
from selfcascade.tiny_models import (
    save_tiny_animatediff,
    save_tiny_text_to_video,
)
from selfcascade.video_pipeline import DEFAULT_FRAMES, VideoResult, VideoSelfCascadePipeline
from tests.selfcascade.single_thread import single_thread_torch  # noqa: F401

PROMPT = "a red ball rolling"
pytestmark = pytest.mark.usefixtures("single_thread_torch")


def request(**overrides: Any) -> GenerationRequest:
    values: dict[str, Any] = {
        "prompt": PROMPT,
        "width": 64,
        "height": 64,
        "steps": 4,
        "seed": 7,
        "num_frames": 3,
    }
    values.update(overrides)
    return GenerationRequest(**values)


def frames_array(frames: list[Any]) -> np.ndarray:
    return np.stack([np.asarray(frame) for frame in frames])  # (F, H, W, 3)


@pytest.fixture(params=["tiny_t2v", "tiny_animatediff"])
def pipe(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)


def stock(pipe: Any) -> Any:
    """The stock diffusers pipeline a user would run, with DDIM like the engine's default."""
    built = type(pipe).from_pipe(pipe, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    built.set_progress_bar_config(disable=True)
    return built


def test_2x_returns_the_requested_frames_at_the_requested_size(pipe: Any) -> None:
    result = VideoSelfCascadePipeline(pipe).generate(request(width=128, height=128))
    assert isinstance(result, VideoResult)
    assert result.stages == [StageSize(64, 64), StageSize(128, 128)]
    assert len(result.frames) == 3
    assert {frame.size for frame in result.frames} == {(128, 128)}
    assert result.stage_steps == [4, 2]
    assert result.unet_evaluations == 6  # CFG batched: one UNet call per step
    assert len(result.stage_seconds) == 2 and result.total_seconds > 0


def test_same_seed_gives_the_same_video_and_another_seed_another(pipe: Any) -> None:
    engine = VideoSelfCascadePipeline(pipe)
    first = engine.generate(request(width=128, height=96, seed=5))
    again = engine.generate(request(width=128, height=96, seed=5))
    other = engine.generate(request(width=128, height=96, seed=6))
    assert np.array_equal(frames_array(first.frames), frames_array(again.frames))
    assert not np.array_equal(frames_array(first.frames), frames_array(other.frames))


def test_single_stage_is_bit_identical_to_the_stock_pipeline(pipe: Any) -> None:
    result = VideoSelfCascadePipeline(pipe).generate(request())
    expected = stock(pipe)(
        prompt=PROMPT,
        height=64,
        width=64,
        num_frames=3,
        num_inference_steps=4,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(7),
        output_type="pil",
    ).frames[0]
    assert result.stages == [StageSize(64, 64)]
    assert np.array_equal(frames_array(result.frames), frames_array(expected))


def test_direct_method_runs_one_stage_at_the_target_size(pipe: Any) -> None:
    result = VideoSelfCascadePipeline(pipe).generate(
        request(width=128, height=128, method="direct")
    )
    assert result.stages == [StageSize(128, 128)]
    assert {frame.size for frame in result.frames} == {(128, 128)}


def reference_cascade(pipe: Any, req: GenerationRequest, base: StageSize) -> np.ndarray:
    """A 2-stage cascade written out by hand: stock stage 1, then upsample every frame, noise
    to the pivot timestep and a hand-written DDIM + CFG loop over the raw UNet."""
    generator = torch.Generator().manual_seed(req.seed)
    frames = req.num_frames or DEFAULT_FRAMES
    with torch.inference_mode():
        pivot = stock(pipe)(
            prompt=PROMPT,
            height=base.height,
            width=base.width,
            num_frames=frames,
            num_inference_steps=req.steps,
            guidance_scale=req.guidance_scale,
            generator=generator,
            output_type="latent",
        ).frames  # (1, C, F, h, w)
        b, c, f, h, w = pivot.shape
        per_frame = pivot.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        up = F.interpolate(per_frame, size=(req.height // 2, req.width // 2), mode="bilinear")
        up = up.reshape(b, f, c, *up.shape[-2:]).permute(0, 2, 1, 3, 4)  # (1, C, F, H, W)

        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(req.steps)
        timesteps = scheduler.timesteps[req.steps - int(req.steps * req.pivot_strength) :]
        if isinstance(pipe, AnimateDiffPipeline):
            noise = torch.randn(up.shape, generator=generator)
        else:  # VideoToVideoSDPipeline draws its noise frame-major, (B*F, C, H, W)
            noise = torch.randn((f, c, *up.shape[-2:]), generator=generator)
            noise = noise.reshape(b, f, c, *up.shape[-2:]).permute(0, 2, 1, 3, 4)
        latents = scheduler.add_noise(up, noise, timesteps[:1])

        positive, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
        text = torch.cat([negative, positive])
        if isinstance(pipe, AnimateDiffPipeline):  # the motion UNet takes per-frame text states
            text = text.repeat_interleave(f, dim=0)
        for t in timesteps:
            eps = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=text).sample
            uncond, cond = eps.chunk(2)
            eps = uncond + req.guidance_scale * (cond - uncond)
            latents = scheduler.step(eps, t, latents).prev_sample
        video = pipe.decode_latents(latents)
        clip = pipe.video_processor.postprocess_video(video=video, output_type="pil")[0]
    return frames_array(clip)


def test_renoise_stage_matches_a_hand_written_reference(pipe: Any) -> None:
    req = request(width=128, height=96)
    result = VideoSelfCascadePipeline(pipe).generate(req)
    assert result.stages == [StageSize(72, 56), StageSize(128, 96)]
    ours = frames_array(result.frames).astype(int)
    reference = reference_cascade(pipe, req, result.stages[0]).astype(int)
    assert ours.shape == reference.shape == (3, 96, 128, 3)
    # Same arithmetic, other kernels for the 5-D DDIM step: at most one level of rounding.
    assert np.abs(ours - reference).max() <= 1


def test_progress_covers_every_step_of_every_stage(pipe: Any) -> None:
    seen: list[Progress] = []
    VideoSelfCascadePipeline(pipe).generate(request(width=128, height=128), on_progress=seen.append)
    assert [(p.stage, p.step, p.steps) for p in seen] == [
        (1, 1, 4),
        (1, 2, 4),
        (1, 3, 4),
        (1, 4, 4),
        (2, 1, 2),
        (2, 2, 2),
    ]
    assert seen[-1].fraction == 1.0


def test_cancel_stops_between_two_steps(pipe: Any) -> None:
    cancel = threading.Event()

    def on_progress(p: Progress) -> None:
        if p.stage == 1 and p.step == 2:
            cancel.set()

    with pytest.raises(GenerationCancelled) as caught:
        VideoSelfCascadePipeline(pipe).generate(
            request(width=128, height=128), on_progress=on_progress, cancel=cancel
        )
    assert (caught.value.stage, caught.value.step) == (1, 2)


def test_frames_default_when_the_request_names_none(tiny_t2v: Any) -> None:
    engine = VideoSelfCascadePipeline(tiny_t2v)
    assert engine.num_frames(request(num_frames=None)) == DEFAULT_FRAMES
    assert engine.num_frames(request(num_frames=5)) == 5


@pytest.mark.parametrize("bad", [0, MAX_FRAMES + 1, -1, 2.0, True, "4"])
def test_num_frames_outside_the_range_is_refused(bad: Any) -> None:
    with pytest.raises(InvalidRequest) as caught:
        request(num_frames=bad).validate(8)
    assert caught.value.param == "num_frames"


def test_image_engine_refuses_a_frame_count(tiny_sd: Any) -> None:
    engine = SelfCascadePipeline(tiny_sd)
    assert engine.produces_video is False
    with pytest.raises(InvalidRequest) as caught:
        engine.validate(request(num_frames=4))
    assert caught.value.param == "num_frames"


def test_engine_for_picks_the_engine_by_pipeline(tiny_sd: Any, pipe: Any) -> None:
    assert type(engine_for(tiny_sd)) is SelfCascadePipeline
    video_engine = engine_for(pipe)
    assert type(video_engine) is VideoSelfCascadePipeline and video_engine.produces_video
    assert video_engine.native_size == StageSize(64, 64)
    assert video_engine.size_multiple == 8 and video_engine.stage_multiple == 8


@pytest.mark.parametrize(
    ("save", "cls"),
    [
        (save_tiny_text_to_video, TextToVideoSDPipeline),
        (save_tiny_animatediff, AnimateDiffPipeline),
    ],
)
def test_saved_tiny_video_folders_load_and_generate(tmp_path: Path, save: Any, cls: type) -> None:
    folder = save(tmp_path / "model")
    pipe = load_pipeline(str(folder), device="cpu")
    assert isinstance(pipe, cls)
    result = engine_for(pipe).generate(request(width=128, height=64, steps=2, num_frames=2))
    assert len(result.frames) == 2 and result.frames[0].size == (128, 64)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++", "euler"])
def test_every_scheduler_runs_a_two_stage_video(pipe: Any, scheduler: str) -> None:
    result = VideoSelfCascadePipeline(pipe).generate(
        request(width=128, height=128, steps=3, num_frames=2, scheduler=scheduler)
    )
    assert len(result.frames) == 2 and result.frames[0].size == (128, 128)
    assert result.unet_evaluations == 3 + 2
    assert np.asarray(result.frames[0]).std() > 0  # not a blank (NaN-decoded) frame


@pytest.mark.parametrize("frames_flag", ["--num-frames", "--frames"])  # the API's name, the old
def test_cli_generate_writes_an_animated_image_for_a_video_model(
    tmp_path: Path, frames_flag: str
) -> None:
    from PIL import Image

    from selfcascade.cli import main as cli_main

    model = save_tiny_animatediff(tmp_path / "model")
    out = tmp_path / "clip.gif"
    code = cli_main(
        [
            "generate", "--model", str(model), "--prompt", "x", "--width", "128", "--height",
            "64", "--steps", "2", frames_flag, "3", "--out", str(out), "--device", "cpu",
        ]
    )  # fmt: skip
    assert code == 0
    with Image.open(out) as clip:
        assert clip.size == (128, 64) and clip.n_frames == 3
        assert clip.info["duration"] in (120, 130)  # the default 8 fps, in GIF's 10 ms units


@pytest.fixture(scope="module")
def animatediff_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_animatediff(tmp_path_factory.mktemp("cli") / "model")


def cli_generate_clip(model: Path, out: Path, *args: str) -> int:
    from selfcascade.cli import main as cli_main

    return cli_main(
        [
            "generate", "--model", str(model), "--prompt", "x", "--width", "128", "--height",
            "64", "--steps", "2", "--num-frames", "3", "--out", str(out), "--device", "cpu", *args,
        ]
    )  # fmt: skip


@pytest.mark.parametrize(("name", "codec"), [("clip.mp4", "h264"), ("clip.webm", "vp9")])
def test_cli_generate_encodes_a_clip_as_the_service_does(
    animatediff_folder: Path, tmp_path: Path, name: str, codec: str
) -> None:
    import av

    out = tmp_path / name
    assert cli_generate_clip(animatediff_folder, out, "--fps", "4") == 0
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_image() for frame in container.decode(stream)]
        assert (stream.codec_context.name, stream.average_rate) == (codec, 4)
    assert len(frames) == 3 and frames[0].size == (128, 64)


def test_cli_generate_names_the_files_a_clip_can_be(
    animatediff_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_generate_clip(animatediff_folder, tmp_path / "clip.jpg") == 2
    # Was "an animated .gif, .png or .webp" (and for .mp4: "use .png, .webp or .jpg").
    assert "a clip needs .mp4, .webm, or an animated .gif, .png or .webp, not clip.jpg" in (
        capsys.readouterr().err
    )


def test_large_clips_decode_tiled_and_tiling_is_undone(pipe: Any, monkeypatch: Any) -> None:
    switched: list[bool] = []
    vae = pipe.vae
    enable_tiling = vae.enable_tiling

    def recorded_enable_tiling() -> None:
        switched.append(True)
        enable_tiling()

    monkeypatch.setattr(vae, "enable_tiling", recorded_enable_tiling)
    # 3 frames of 128x128 decode in one VAE call: one pixel over the threshold tiles.
    engine = VideoSelfCascadePipeline(pipe, tiled_decode_above_pixels=3 * 128 * 128 - 1)
    result = engine.generate(request(width=128, height=128, steps=2, num_frames=3))
    assert switched == [True] and vae.use_tiling is False
    assert len(result.frames) == 3 and result.frames[0].size == (128, 128)
    switched.clear()
    engine = VideoSelfCascadePipeline(pipe, tiled_decode_above_pixels=3 * 128 * 128)
    engine.generate(request(width=128, height=128, steps=2, num_frames=3))
    assert switched == []


def test_animatediff_refuses_more_frames_than_its_motion_module_takes(
    tiny_animatediff: Any,
) -> None:
    engine = VideoSelfCascadePipeline(tiny_animatediff)
    engine.validate(request(num_frames=32))
    with pytest.raises(InvalidRequest) as caught:
        engine.validate(request(num_frames=33))
    assert caught.value.param == "num_frames"
