"""The demo model and its 2x upsamplers shipped in models/: they load and run as users run them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from contract.settings import DEMO_MODEL_NAME, Settings, default_model_spec
from selfcascade.demo import card as demo_card
from selfcascade.demo.samples import GAP_PX, sample_strip
from selfcascade.loading import load_pipeline
from selfcascade.pipeline import SelfCascadePipeline
from selfcascade.request import GenerationRequest
from selfcascade.tuned import load_tuned_hook

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "demo"
UPSAMPLERS = ROOT / demo_card.UPSAMPLERS[0]  # the default 2x set
MAX_BYTES = 30 * 2**20


def test_the_shipped_folder_is_small_and_loads_with_stock_diffusers() -> None:
    size = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    size += UPSAMPLERS.stat().st_size
    assert size <= MAX_BYTES
    pipe = StableDiffusionPipeline.from_pretrained(DEMO)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)


@pytest.mark.parametrize("tuned", [False, True])
def test_a_2x_cascade_runs_on_the_demo_model(tuned: bool) -> None:
    pipe = load_pipeline(str(DEMO), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    hooks = [load_tuned_hook(UPSAMPLERS, pipe)] if tuned else []
    result = SelfCascadePipeline(pipe).generate(
        GenerationRequest(prompt="a red circle and a blue square", width=128, height=128, steps=4),
        stage_hooks=hooks,
    )
    assert result.images[0].size == (128, 128)
    assert [s.width for s in result.stages] == [64, 128]


def test_the_demo_model_is_the_default_when_present() -> None:
    spec = default_model_spec(Settings(demo_model_dir=DEMO, demo_upsamplers=[UPSAMPLERS]))
    assert spec.name == DEMO_MODEL_NAME
    assert spec.upsamplers == [str(UPSAMPLERS)]
    assert spec.default_pivot_strength == demo_card.PIVOT_STRENGTH
    missing = default_model_spec(Settings(demo_model_dir=ROOT / "no-such-model"))
    assert missing.name == "tiny"


def test_the_demo_upsamplers_setting_reads_comma_separated_paths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SELFCASCADE_DEMO_UPSAMPLERS", f"{UPSAMPLERS}, /no/such.safetensors")
    settings = Settings(demo_model_dir=DEMO)
    assert settings.demo_upsamplers == [UPSAMPLERS, Path("/no/such.safetensors")]
    assert default_model_spec(settings).upsamplers == [str(UPSAMPLERS)]  # those present


def test_the_readme_sample_strip_is_built_from_the_shipped_model_and_upsamplers() -> None:
    strip = sample_strip(
        str(DEMO), [UPSAMPLERS], "a red circle", scale=2, seeds=[1, 2], steps=3, guidance=5.0
    )
    assert strip.size == (2 * 128 + GAP_PX, 128)
