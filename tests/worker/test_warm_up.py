"""A worker warms each model up at load (one short job), unless the setting turns it off; the
CUDA graph setting reaches its engine."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from contract.settings import ModelSpec
from selfcascade import warmup
from selfcascade.errors import ModelLoadError
from selfcascade.tiny_models import build_tiny_sd_pipeline
from tests.service.conftest import SettingsFactory
from worker import resident


def spec(path: Path) -> ModelSpec:
    return ModelSpec(name="tiny", path=str(path), native_width=64, native_height=64)


@pytest.mark.parametrize("enabled", [True, False])
def test_models_are_warmed_up_at_load_when_enabled(
    settings_for: SettingsFactory, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture,
    enabled: bool,
) -> None:
    caplog.set_level(logging.INFO, logger="selfcascade.warmup")
    [model] = resident.load_models(
        [spec(tiny_model_dir)], settings_for(warm_up_on_load=enabled)
    ).values()
    warmed = [r.getMessage() for r in caplog.records if "warm-up job" in r.getMessage()]
    assert len(warmed) == (1 if enabled else 0)
    if enabled:
        native = model.engine.native_size
        assert f"({native.width * 2}x{native.height * 2}, 2 steps)" in warmed[0]


def test_a_failed_warm_up_refuses_the_model_in_one_line(
    settings_for: SettingsFactory, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a card too small for the model's 2x stage does at start-up (the job would fail too).
    def out_of_memory(engine: object, **options: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(warmup, "warm_up", out_of_memory)
    with pytest.raises(resident.ModelRefused, match=r"model tiny: its warm-up generation failed "
                       r"\(OutOfMemoryError: CUDA out of memory"):
        resident.load_models([spec(tiny_model_dir)], settings_for(warm_up_on_load=True))


@pytest.mark.parametrize(
    ("setting", "engine_limit"), [(None, 1024 * 1024), (0, None), (512 * 512, 512 * 512)]
)
def test_the_cuda_graph_setting_reaches_the_engine(
    settings_for: SettingsFactory, tiny_model_dir: Path, setting: int | None,
    engine_limit: int | None,
) -> None:
    """Unset: the engine's default; 0: graphs off; otherwise the largest graphed stage."""
    settings = settings_for(warm_up_on_load=False, cuda_graph_max_pixels=setting)
    [model] = resident.load_models([spec(tiny_model_dir)], settings).values()
    assert model.engine.unet_graphs.max_pixels == engine_limit


def test_the_compile_setting_compiles_every_stage_of_the_warm_up_at_its_scale(
    settings_for: SettingsFactory, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(resident, "COMPILE_BACKEND", "eager")  # inductor: minutes on a CPU
    caplog.set_level(logging.INFO, logger="selfcascade.warmup")
    torch._dynamo.reset()
    [model] = resident.load_models(
        [spec(tiny_model_dir)], settings_for(warm_up_on_load=True, torch_compile_scale=4)
    ).values()
    compiled = model.engine.unet_graphs.compiled
    assert compiled is not None and compiled.backend == "eager"
    assert compiled.compiled_signatures == 3  # 64 -> 128 -> 256 px
    assert "(256x256, 2 steps)" in caplog.text
    # Off by default.
    [plain] = resident.load_models(
        [spec(tiny_model_dir)], settings_for(warm_up_on_load=False)
    ).values()
    assert plain.engine.unet_graphs.compiled is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"torch_compile_scale": 1}, r"must be 0 \(off\) or a power of two from 2"),
        ({"torch_compile_scale": 3}, r"a power of two from 2 .*got 3"),
        ({"torch_compile_scale": 2, "warm_up_on_load": False}, "needs warm_up_on_load"),
    ],
)
def test_compile_settings_that_would_compile_nothing_are_refused(
    settings_for: SettingsFactory, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        settings_for(**options)


def test_the_compiling_warm_up_stays_within_max_pixels(
    settings_for: SettingsFactory, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A stage the API never admits would be compiled for nothing (and might not fit).
    monkeypatch.setattr(resident, "COMPILE_BACKEND", "eager")
    caplog.set_level(logging.INFO, logger="selfcascade.warmup")
    torch._dynamo.reset()
    settings = settings_for(warm_up_on_load=True, torch_compile_scale=8, max_pixels=256 * 256)
    resident.load_models([spec(tiny_model_dir)], settings)
    assert "(256x256, 2 steps)" in caplog.text
    assert "(512x512" not in caplog.text


def test_a_models_file_variant_reaches_the_loader(
    settings_for: SettingsFactory, tmp_path: Path
) -> None:
    folder = tmp_path / "tiny-fp16"
    build_tiny_sd_pipeline(0).save_pretrained(folder, safe_serialization=True, variant="fp16")
    spec = ModelSpec.model_validate({
        "name": "tiny", "path": str(folder), "native_width": 64, "native_height": 64,
        "variant": "fp16",
    })
    [model] = resident.load_models([spec], settings_for(warm_up_on_load=False)).values()
    assert model.spec.name == "tiny"


def test_a_model_that_fails_to_load_is_named_by_its_entry(
    settings_for: SettingsFactory, tmp_path: Path
) -> None:
    folder = tmp_path / "tiny-fp16"
    build_tiny_sd_pipeline(0).save_pretrained(folder, safe_serialization=True, variant="fp16")
    spec = ModelSpec(name="sdxl", path=str(folder), native_width=64, native_height=64)
    settings = settings_for(warm_up_on_load=False)
    with pytest.raises(ModelLoadError) as refused:  # a models file may list several
        resident.load_models([spec], settings)
    assert str(refused.value).startswith(
        f"model 'sdxl' of {settings.models_file}: could not load model {str(folder)!r}: no "
        "variant was asked for, but its weights are saved as the variant 'fp16'"
    )
