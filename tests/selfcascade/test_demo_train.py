"""The demo training script, run for a handful of steps: a folder stock diffusers loads."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from selfcascade.demo.train import TrainConfig, parse_args, train
from selfcascade.loading import load_pipeline
from selfcascade.pipeline import SelfCascadePipeline
from selfcascade.request import GenerationRequest
from tests.selfcascade.single_thread import single_thread_torch  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread_torch")

MAX_FOLDER_BYTES = 30 * 2**20


def smoke_config(out: Path) -> TrainConfig:
    return TrainConfig(
        out=out, steps=2, vae_steps=2, batch_size=4, vae_batch_size=2, dataset_size=8,
        checkpoint_every=1, log_every=1,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(smoke_config(tmp_path_factory.mktemp("demo") / "model"))


def test_stock_diffusers_loads_the_folder_and_generates(trained: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(trained)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 4
    assert len(pipe.tokenizer("a red circle").input_ids) == 5
    image = pipe(
        "a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)
    files = [p for p in trained.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_FOLDER_BYTES
    assert any(p.suffix == ".safetensors" for p in files)
    assert not any(p.suffix in (".bin", ".pt") for p in files)


def test_the_engine_serves_it_at_twice_the_native_size(trained: Path) -> None:
    engine = SelfCascadePipeline(load_pipeline(str(trained)))
    assert engine.native_size.width == 64
    result = engine.generate(GenerationRequest("two blue squares", 128, 128, steps=2))
    assert result.images[0].size == (128, 128)
    assert len(result.stages) == 2


def test_training_is_reproducible_from_the_seed(trained: Path, tmp_path: Path) -> None:
    again = train(smoke_config(tmp_path / "model"))
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model"):
        first = load_file(trained / f"{part}.safetensors")
        second = load_file(again / f"{part}.safetensors")
        assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    config = smoke_config(tmp_path / "model")
    train(config)
    with pytest.raises(SystemExit):
        parse_args(["--out", str(config.out)])  # an existing checkpoint needs --resume
    resumed = parse_args(["--out", str(config.out), "--resume", "--steps", "3"])
    train(replace(resumed, batch_size=4, dataset_size=8, vae_batch_size=2))
    state = torch.load(config.checkpoint_dir / "state.pt", weights_only=False)
    assert state["step"] == 3


def test_a_time_budget_shortens_the_run_after_the_warm_up(tmp_path: Path) -> None:
    config = replace(
        smoke_config(tmp_path / "model"), steps=1000, warmup_steps=2, time_budget_s=1e-6,
        checkpoint_every=1000,
    )
    train(config)
    state = torch.load(config.checkpoint_dir / "state.pt", weights_only=False)
    # The rate is measured over the 3 steps up to the end of the warm-up; one more step runs.
    assert state["step"] == 4


def test_a_run_can_start_from_a_saved_model(trained: Path, tmp_path: Path) -> None:
    config = replace(smoke_config(tmp_path / "model"), init_from=str(trained), steps=1)
    train(config)
    before = load_file(trained / "vae/diffusion_pytorch_model.safetensors")
    after = load_file(config.out / "vae/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the VAE is kept as it was
    unet_before = load_file(trained / "unet/diffusion_pytorch_model.safetensors")
    unet_after = load_file(config.out / "unet/diffusion_pytorch_model.safetensors")
    # One step from the saved weights: close to them, not equal (it trained).
    assert not all(torch.equal(unet_before[k], unet_after[k]) for k in unet_before)
    assert all(torch.allclose(unet_before[k], unet_after[k], atol=0.05) for k in unet_before)
