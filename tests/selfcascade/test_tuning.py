"""The tuning loop: it learns, only the upsamplers move, it resumes exactly, bad data is named."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from PIL import Image

from selfcascade.checkpoint import load_upsamplers
from selfcascade.cli import main as cli_main
from selfcascade.errors import CheckpointError, InvalidRequest
from selfcascade.tiny_models import (
    build_tiny_sd_pipeline,
    build_tiny_sdxl_pipeline,
    build_tiny_text_to_video_pipeline,
    save_tiny_sd,
)
from selfcascade.tuned import inject_upsamplers
from selfcascade.tuning import (
    DEFAULT_CLIP_FRAMES,
    LOSS_LOG,
    STATE_FILE,
    UPSAMPLERS_FILE,
    TuneConfig,
    TuningImages,
    TuningModel,
    tune,
)
from selfcascade.upsamplers import FeatureUpsamplerSet
from tests.selfcascade.single_thread import single_thread_torch  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread_torch")

CROP = 128  # tiny models: native 64 px, scale 2


def write_images(folder: Path, count: int = 3, size: tuple[int, int] = (150, 140)) -> Path:
    """Smooth coloured patterns (learnable structure, unlike white noise), with one caption."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    for i in range(count):
        wave = np.sin(xx / (4 + i) + yy / 6)[..., None] * np.array([1.0, 0.5, -1.0])
        Image.fromarray((127 + 120 * wave).astype(np.uint8)).save(folder / f"img{i}.png")
    (folder / "img0.txt").write_text("stripes", encoding="utf-8")
    return folder


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_images(tmp_path / "data")


def config(tmp_path: Path, data: Path, **overrides: Any) -> TuneConfig:
    values: dict[str, Any] = {"data_dir": data, "out_dir": tmp_path / "out", "steps": 4}
    values.update(overrides)
    return TuneConfig(**values)


def fixed_batch_loss(pipe: Any, ups: FeatureUpsamplerSet, data: Path) -> float:
    model = TuningModel(pipe)
    gen = torch.Generator().manual_seed(1234)
    pixels, captions = TuningImages.scan(data, CROP).sample(4, gen)
    batch = model.make_batch(pixels, captions, 2, 700, gen)
    with torch.no_grad():
        return float(model.loss(ups, batch))


def test_twenty_steps_lower_the_loss_and_only_upsamplers_learn(tmp_path: Path, data: Path) -> None:
    pipe = build_tiny_sd_pipeline(seed=0)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    vae = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    before = fixed_batch_loss(pipe, FeatureUpsamplerSet.for_unet(pipe.unet.config), data)

    # A larger lr than the paper's 5e-5 so that 20 steps move a tiny random model measurably.
    result = tune(pipe, config(tmp_path, data, steps=20, lr=2e-3, batch_size=2))

    assert fixed_batch_loss(pipe, result.upsamplers, data) < before
    assert all(torch.equal(v, base[k]) for k, v in pipe.unet.state_dict().items())
    assert all(torch.equal(v, vae[k]) for k, v in pipe.vae.state_dict().items())
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert all(p.grad is None for p in module.parameters())
    assert all(p.grad is not None for p in result.upsamplers.parameters())
    log = [json.loads(line) for line in (tmp_path / "out" / LOSS_LOG).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21))
    assert [r["loss"] for r in log] == result.losses


def test_resume_continues_exactly(tmp_path: Path, data: Path) -> None:
    straight = tune(build_tiny_sd_pipeline(0), config(tmp_path / "a", data, steps=4))
    # Interrupted after step 2 (its last checkpoint), then resumed to step 4.
    tune(build_tiny_sd_pipeline(0), config(tmp_path / "b", data, steps=2, save_every=2))
    resumed = tune(build_tiny_sd_pipeline(0), config(tmp_path / "b", data, steps=4, resume=True))

    assert resumed.start_step == 2
    assert resumed.losses == straight.losses[2:]
    a, b = straight.upsamplers.state_dict(), resumed.upsamplers.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "a" / "out" / STATE_FILE, weights_only=True)
    sb = torch.load(tmp_path / "b" / "out" / STATE_FILE, weights_only=True)
    assert sa["step"] == sb["step"] == 4
    for key, state in sa["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, sb["optimizer"]["state"][key][name]), name
    losses = [
        json.loads(x)["loss"] for x in (tmp_path / "b/out" / LOSS_LOG).read_text().splitlines()
    ]
    assert losses == straight.losses


def test_gradient_checkpointing_gives_the_same_training(tmp_path: Path, data: Path) -> None:
    plain = tune(build_tiny_sd_pipeline(0), config(tmp_path / "a", data, steps=2, lr=1e-3))
    pipe = build_tiny_sd_pipeline(0)
    ckpt = tune(pipe, config(tmp_path / "b", data, steps=2, lr=1e-3, gradient_checkpointing=True))
    assert not pipe.unet.is_gradient_checkpointing  # switched off again afterwards
    assert ckpt.losses == plain.losses
    a, b = plain.upsamplers.state_dict(), ckpt.upsamplers.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_resume_drops_log_lines_past_the_checkpoint(tmp_path: Path, data: Path) -> None:
    cfg = config(tmp_path, data, steps=3, save_every=2)
    tune(build_tiny_sd_pipeline(0), cfg)  # checkpoints at 2 and 3
    state = tmp_path / "out" / STATE_FILE
    # Pretend the run died after logging step 3 but before its checkpoint: rewind the state.
    tune(build_tiny_sd_pipeline(0), replace(cfg, out_dir=tmp_path / "two", steps=2))
    state.write_bytes((tmp_path / "two" / STATE_FILE).read_bytes())
    tune(build_tiny_sd_pipeline(0), replace(cfg, resume=True))
    steps = [json.loads(x)["step"] for x in (tmp_path / "out" / LOSS_LOG).read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_resume_refuses_changed_settings_and_missing_state(tmp_path: Path, data: Path) -> None:
    pipe = build_tiny_sd_pipeline(0)
    with pytest.raises(CheckpointError, match="no training state"):
        tune(pipe, config(tmp_path, data, resume=True))
    tune(pipe, config(tmp_path, data, steps=1))
    with pytest.raises(CheckpointError, match=r"settings changed.*lr"):
        tune(pipe, config(tmp_path, data, steps=2, lr=1e-3, resume=True))
    (tmp_path / "out" / STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a training state this release can read"):
        tune(pipe, config(tmp_path, data, steps=2, resume=True))


def test_resume_with_no_step_left_is_refused_not_reported_as_trained(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture
) -> None:
    tune(build_tiny_sd_pipeline(0), config(tmp_path, data, steps=2))
    saved = (tmp_path / "out" / UPSAMPLERS_FILE).read_bytes()
    with pytest.raises(InvalidRequest, match=r"already at step 2; raise --steps above 2"):
        tune(build_tiny_sd_pipeline(0), config(tmp_path, data, steps=2, resume=True))
    # No model there: the state's step is read, and the run refused, before any model loads.
    args = ["tune", "--model", str(tmp_path / "no-model"), "--data", str(data)]
    assert cli_main([*args, "--out", str(tmp_path / "out"), "--steps", "1", "--resume"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # was "wrote ... after step 1 (started at 2)", exit 0
    assert captured.err == (
        f"selfcascade: error: --steps: the run in {tmp_path / 'out'} is already at step 2; "
        "raise --steps above 2 to train further\n"
    )
    assert (tmp_path / "out" / UPSAMPLERS_FILE).read_bytes() == saved
    torch.save(torch.zeros(1), tmp_path / "out" / STATE_FILE)
    with pytest.raises(CheckpointError, match="not a training state this release can read"):
        tune(build_tiny_sd_pipeline(0), config(tmp_path, data, steps=3, resume=True))


def test_a_fresh_run_over_an_earlier_one_needs_resume_or_overwrite(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    tune(build_tiny_sd_pipeline(0), config(tmp_path, data, steps=2))
    saved = (out / UPSAMPLERS_FILE).read_bytes()
    # No model there: refused before any model loads, the earlier run left as it was.
    args = ["tune", "--model", str(tmp_path / "no-model"), "--data", str(data), "--steps", "1"]
    assert cli_main([*args, "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"selfcascade: error: --out: {out} already holds a tuning run at step 2: pass --resume "
        "to continue it, or --overwrite to start again from step 0\n"
    )
    assert (out / UPSAMPLERS_FILE).read_bytes() == saved
    assert len((out / LOSS_LOG).read_text().splitlines()) == 2
    with pytest.raises(InvalidRequest, match="overwrite: cannot be combined with --resume"):
        tune(build_tiny_sd_pipeline(0), config(tmp_path, data, resume=True, overwrite=True))

    # --overwrite starts again; stopped before its first step, it leaves no state to resume.
    def stop(*args: Any) -> Any:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(TuningImages, "sample", stop)
        tune(build_tiny_sd_pipeline(0), config(tmp_path, data, steps=1, overwrite=True))
    assert not (out / STATE_FILE).exists() and not (out / UPSAMPLERS_FILE).exists()
    result = tune(build_tiny_sd_pipeline(0), config(tmp_path, data, steps=1, overwrite=True))
    assert result.start_step == 0
    assert [json.loads(x)["step"] for x in (out / LOSS_LOG).read_text().splitlines()] == [1]
    assert torch.load(out / STATE_FILE, weights_only=True)["step"] == 1

    # A checkpoint alone (copied there, say) cannot be resumed: only --overwrite is offered.
    (out / STATE_FILE).unlink()
    with pytest.raises(InvalidRequest, match=r"holds upsamplers\.safetensors \(no training_state"):
        tune(build_tiny_sd_pipeline(0), config(tmp_path, data, steps=1))


def test_resume_takes_the_default_crop_size_named_explicitly(tmp_path: Path, data: Path) -> None:
    pipe = build_tiny_sd_pipeline(0)
    tune(pipe, config(tmp_path, data, steps=1, crop_size=None))
    result = tune(pipe, config(tmp_path, data, steps=2, crop_size=CROP, resume=True))
    assert result.start_step == 1  # was refused: "settings changed (crop_size)"


def test_resume_takes_the_default_clip_frames_named_explicitly(tmp_path: Path) -> None:
    pipe = build_tiny_text_to_video_pipeline(0)
    clips = tmp_path / "clips"
    write_images(clips / "walk", count=DEFAULT_CLIP_FRAMES)  # one clip: a folder of frames
    tune(pipe, config(tmp_path, clips, steps=1, crop_size=64))  # small: 8 frames a step
    # Past the settings check (which comes first), to the step count's: the same run.
    with pytest.raises(InvalidRequest, match="already at step 1"):
        tune(
            pipe,
            config(
                tmp_path, clips, steps=1, crop_size=64, clip_frames=DEFAULT_CLIP_FRAMES, resume=True
            ),
        )
    with pytest.raises(CheckpointError, match=r"since it was saved \(clip_frames\)"):
        tune(pipe, config(tmp_path, clips, steps=2, crop_size=64, clip_frames=4, resume=True))


def test_final_checkpoint_loads_for_serving(tmp_path: Path, data: Path) -> None:
    pipe = build_tiny_sd_pipeline(0)
    result = tune(pipe, config(tmp_path, data, steps=2))
    loaded = load_upsamplers(tmp_path / "out" / UPSAMPLERS_FILE, pipe.unet)
    assert loaded.pivot_timestep == 700 and loaded.scale == 2.0
    assert loaded.hr_size == CROP  # native size x scale: the stage it was tuned for
    assert loaded.extra["tuning_step"] == "2"
    a, b = result.upsamplers.state_dict(), loaded.upsamplers.state_dict()
    assert all(torch.equal(a[k].cpu(), b[k]) for k in a)


def test_v_prediction_target_is_the_velocity(data: Path) -> None:
    pipe = build_tiny_sd_pipeline(0)
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, prediction_type="v_prediction"
    )
    model = TuningModel(pipe)
    gen = torch.Generator().manual_seed(0)
    pixels, captions = TuningImages.scan(data, CROP).sample(2, gen)
    batch = model.make_batch(pixels, captions, 2, 700, gen)
    ups = FeatureUpsamplerSet.for_unet(pipe.unet.config)
    sched = model.noise_scheduler
    noisy = sched.add_noise(batch.latents, batch.noise, batch.timesteps)
    with torch.no_grad():
        with inject_upsamplers(pipe.unet, ups, batch.pivot):
            pred = pipe.unet(
                noisy, batch.timesteps, encoder_hidden_states=batch.encoder_hidden_states
            ).sample
        loss = model.loss(ups, batch)
    velocity = sched.get_velocity(batch.latents, batch.noise, batch.timesteps)
    assert torch.equal(loss, F.mse_loss(pred, velocity))
    assert not torch.equal(loss, F.mse_loss(pred, batch.noise))
    assert int(batch.timesteps.min()) >= 1 and int(batch.timesteps.max()) <= 700


def test_sdxl_tiny_model_tunes(tmp_path: Path, data: Path) -> None:
    pipe = build_tiny_sdxl_pipeline(0)
    result = tune(pipe, config(tmp_path, data, steps=2))
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    load_upsamplers(result.checkpoint, pipe.unet)


def test_bad_data_is_named(tmp_path: Path, tiny_sd: Any) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidRequest, match="no images"):
        tune(tiny_sd, config(tmp_path, empty))

    broken = write_images(tmp_path / "broken", count=1)
    (broken / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(InvalidRequest, match=r"bad\.jpg is not a readable image"):
        tune(tiny_sd, config(tmp_path, broken))

    truncated = write_images(tmp_path / "truncated", count=1)
    png = (truncated / "img0.png").read_bytes()
    (truncated / "img0.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(InvalidRequest, match=r"img0\.png is not a readable image"):
        tune(tiny_sd, config(tmp_path, truncated))

    small = write_images(tmp_path / "small", count=1, size=(200, 100))
    with pytest.raises(InvalidRequest, match=r"img0\.png is 200x100, smaller than the 128x128"):
        tune(tiny_sd, config(tmp_path, small))


def test_bad_arguments_are_named(tmp_path: Path, data: Path, tiny_sd: Any) -> None:
    with pytest.raises(InvalidRequest, match="steps"):
        tune(tiny_sd, config(tmp_path, data, steps=0))
    with pytest.raises(InvalidRequest, match="crop_size"):
        tune(tiny_sd, config(tmp_path, data, crop_size=100))
    (tmp_path / "a-file").touch()
    with pytest.raises(InvalidRequest, match="a-file: it is a file"):
        tune(tiny_sd, config(tmp_path, data, out_dir=tmp_path / "a-file"))


def test_cli_tune_and_resume(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture) -> None:
    model = save_tiny_sd(tmp_path / "model")
    args = ["tune", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "o")]
    assert cli_main([*args, "--steps", "2"]) == 0
    assert cli_main([*args, "--steps", "3", "--resume"]) == 0
    assert "after step 3 (started at 2)" in capsys.readouterr().out
    assert cli_main([*args, "--data", str(tmp_path / "missing"), "--steps", "1"]) != 0
    assert "missing is not a directory" in capsys.readouterr().err


def test_cli_refuses_an_unusable_out_in_one_line_before_loading_the_model(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture
) -> None:
    a_file = tmp_path / "README.md"
    a_file.write_text("notes", encoding="utf-8")
    # No model there: had it been loaded first, the error would name the model, not --out.
    args = ["tune", "--model", str(tmp_path / "no-model"), "--data", str(data), "--steps", "1"]
    assert cli_main([*args, "--out", str(a_file)]) == 2
    assert capsys.readouterr().err == (
        f"selfcascade: error: --out: cannot write into {a_file}: it is a file, not a folder\n"
    )
    assert cli_main([*args, "--out", str(a_file / "ckx")]) == 2
    assert capsys.readouterr().err == (
        f"selfcascade: error: --out: cannot write into {a_file / 'ckx'}: a folder above it is a "
        "file\n"
    )
    assert a_file.read_text(encoding="utf-8") == "notes"


def test_cli_bad_data_is_one_error_line_with_no_progress_bar(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "my_images"
    args = ["tune", "--model", str(tmp_path / "no-model"), "--steps", "1"]
    assert cli_main([*args, "--data", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"selfcascade: error: --data: {missing} is not a directory\n"
    assert not (tmp_path / "o").exists()  # refused before --out was created

    # Found only once the model says what to look for (images or clips): still no bar.
    empty = tmp_path / "empty"
    empty.mkdir()
    model = save_tiny_sd(tmp_path / "model")
    args = ["tune", "--model", str(model), "--data", str(empty), "--steps", "1"]
    assert cli_main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfcascade: error: --data: no images") and err.count("\n") == 1


def test_cli_generate_uses_and_verifies_the_tuned_checkpoint(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture
) -> None:
    model = save_tiny_sd(tmp_path / "model")
    other = save_tiny_sd(tmp_path / "other", seed=5)
    args = ["tune", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "o")]
    assert cli_main([*args, "--steps", "1"]) == 0
    ckpt = str(tmp_path / "o" / UPSAMPLERS_FILE)
    generate = ["generate", "--prompt", "x", "--width", "128", "--height", "128", "--steps", "2"]
    out = tmp_path / "img.png"
    assert (
        cli_main([*generate, "--model", str(model), "--upsamplers", ckpt, "--out", str(out)]) == 0
    )
    assert Image.open(out).size == (128, 128)
    capsys.readouterr()
    assert (
        cli_main([*generate, "--model", str(other), "--upsamplers", ckpt, "--out", str(out)]) != 0
    )
    assert "another base model" in capsys.readouterr().err


def test_a_half_precision_vae_that_needs_upcasting_encodes_in_fp32() -> None:
    """SDXL's VAE (force_upcast) overflows in fp16; tuning encodes with it in fp32 and hands the
    UNet latents in the UNet's own dtype."""
    pipe = build_tiny_sdxl_pipeline().to(dtype=torch.float16)
    pipe.vae.register_to_config(force_upcast=True)
    model = TuningModel(pipe)
    assert pipe.vae.dtype == torch.float32 and pipe.unet.dtype == torch.float16
    pixels = torch.zeros(1, 3, 64, 64)
    latents = model.encode_images(pixels, torch.Generator().manual_seed(0))
    assert latents.dtype == torch.float16 and torch.isfinite(latents).all()
