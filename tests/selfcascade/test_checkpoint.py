"""Upsampler checkpoints: exact round trip, metadata, refusal of foreign or damaged files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from selfcascade.checkpoint import (
    FORMAT_VERSION,
    load_upsamplers,
    save_upsamplers,
    unet_weights_probe,
)
from selfcascade.errors import CheckpointError
from selfcascade.tiny_models import build_tiny_sd_pipeline
from selfcascade.tuned import TunedStageHook, load_tuned_hook
from selfcascade.upsamplers import FeatureUpsamplerSet


def random_set(pipe: Any, seed: int = 0) -> FeatureUpsamplerSet:
    ups = FeatureUpsamplerSet.for_unet(pipe.unet.config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ups.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return ups


@pytest.fixture
def saved(tmp_path: Path, tiny_sd: Any) -> tuple[Path, FeatureUpsamplerSet]:
    ups = random_set(tiny_sd)
    path = save_upsamplers(tmp_path / "ups.safetensors", ups, tiny_sd.unet, 2, 700)
    return path, ups


def test_round_trip_is_exact(saved: tuple[Path, FeatureUpsamplerSet], tiny_sd: Any) -> None:
    path, ups = saved
    loaded = load_upsamplers(path, tiny_sd.unet)
    before, after = ups.state_dict(), loaded.upsamplers.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert loaded.upsamplers.config == ups.config
    assert (loaded.scale, loaded.pivot_timestep) == (2.0, 700)
    assert loaded.parameter_count == ups.parameter_count()


@pytest.mark.parametrize(
    ("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)], ids=["umask022", "umask027"]
)
def test_file_mode_follows_the_umask(tmp_path: Path, tiny_sd: Any, umask: int, mode: int) -> None:
    """Not 0600: a checkpoint copied into a read-only mount must be readable by another uid."""
    previous = os.umask(umask)
    try:
        path = save_upsamplers(
            tmp_path / "ups.safetensors", random_set(tiny_sd), tiny_sd.unet, 2, 700
        )
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == mode


def test_a_failed_save_leaves_the_checkpoint_there_and_no_partial_file(
    saved: tuple[Path, FeatureUpsamplerSet], tiny_sd: Any
) -> None:
    path, _ = saved
    before = path.read_bytes()
    # The new file is written whole, then cannot be renamed onto a non-empty folder of that
    # name; the saved one beside it is untouched and the partial one is gone.
    blocked = path.with_name("blocked.safetensors")
    (blocked / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        save_upsamplers(blocked, random_set(tiny_sd, seed=1), tiny_sd.unet, 2, 700)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["blocked.safetensors", path.name]


def test_metadata_names_format_base_model_and_architecture(
    saved: tuple[Path, FeatureUpsamplerSet],
) -> None:
    path, ups = saved
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format_version"] == str(FORMAT_VERSION)
    assert len(meta["base_config_sha256"]) == 64
    assert len(json.loads(meta["base_weights_probe"])) > 0
    assert json.loads(meta["architecture"])["levels"][0] == {"name": "down_0", "channels": 4}
    assert meta["parameter_count"] == str(ups.parameter_count())


def test_another_base_model_is_refused(saved: tuple[Path, FeatureUpsamplerSet]) -> None:
    path, _ = saved
    same_shape_other_weights = build_tiny_sd_pipeline(seed=1)
    with pytest.raises(CheckpointError, match=r"another base model.*weights differ"):
        load_upsamplers(path, same_shape_other_weights.unet)


def test_another_architecture_is_refused(
    saved: tuple[Path, FeatureUpsamplerSet], tiny_sdxl: Any
) -> None:
    path, _ = saved
    with pytest.raises(CheckpointError, match=r"another base model.*config differs"):
        load_upsamplers(path, tiny_sdxl.unet)


def test_same_model_in_half_precision_is_accepted(saved: tuple[Path, FeatureUpsamplerSet]) -> None:
    path, _ = saved
    unet = build_tiny_sd_pipeline(seed=0).unet.to(torch.bfloat16)
    load_upsamplers(path, unet)  # the fingerprint tolerates dtype rounding
    assert unet_weights_probe(unet) != unet_weights_probe(build_tiny_sd_pipeline(seed=0).unet)


@pytest.mark.parametrize("keep", [0, 8, 100, -40])
def test_truncated_file_is_refused(
    saved: tuple[Path, FeatureUpsamplerSet], tiny_sd: Any, keep: int
) -> None:
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_upsamplers(path, tiny_sd.unet)


def test_garbage_and_missing_files_are_refused(tmp_path: Path, tiny_sd: Any) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 4096)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_upsamplers(junk, tiny_sd.unet)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_upsamplers(tmp_path / "nope.safetensors", tiny_sd.unet)


def test_foreign_safetensors_file_is_refused(tmp_path: Path, tiny_sd: Any) -> None:
    path = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a selfcascade upsampler checkpoint"):
        load_upsamplers(path, tiny_sd.unet)


def test_tensor_tampering_is_refused(saved: tuple[Path, FeatureUpsamplerSet], tiny_sd: Any) -> None:
    path, _ = saved
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors.pop(next(iter(tensors)))
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_upsamplers(path, tiny_sd.unet)


def test_load_tuned_hook_verifies_before_any_job(
    saved: tuple[Path, FeatureUpsamplerSet], tiny_sd: Any
) -> None:
    path, _ = saved
    assert isinstance(load_tuned_hook(path, tiny_sd), TunedStageHook)
    with pytest.raises(CheckpointError):
        load_tuned_hook(path, build_tiny_sd_pipeline(seed=3))


def test_tuning_size_round_trips_and_several_sets_load_into_one_hook(
    tmp_path: Path, tiny_sd: Any
) -> None:
    at_128 = save_upsamplers(
        tmp_path / "a.safetensors", random_set(tiny_sd, 1), tiny_sd.unet, 2, 700, hr_size=128
    )
    at_256 = save_upsamplers(
        tmp_path / "b.safetensors", random_set(tiny_sd, 2), tiny_sd.unet, 2, 700, hr_size=256
    )
    assert load_upsamplers(at_256, tiny_sd.unet).hr_size == 256
    hook = load_tuned_hook([at_128, at_256], tiny_sd)
    assert [s.hr_size for s in hook.sets] == [128, 256]


def test_a_set_without_its_tuning_size_loads_alone_but_not_among_several(
    saved: tuple[Path, FeatureUpsamplerSet], tmp_path: Path, tiny_sd: Any
) -> None:
    unsized, _ = saved  # written without hr_size, as checkpoints were before it was recorded
    assert load_upsamplers(unsized, tiny_sd.unet).hr_size is None
    assert len(load_tuned_hook(unsized, tiny_sd).sets) == 1
    sized = save_upsamplers(
        tmp_path / "b.safetensors", random_set(tiny_sd, 2), tiny_sd.unet, 2, 700, hr_size=256
    )
    with pytest.raises(CheckpointError, match=r"ups.safetensors does not record the size"):
        load_tuned_hook([unsized, sized], tiny_sd)
