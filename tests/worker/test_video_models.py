"""A worker loads video models through the same registry as image models, and refuses to start
when the models file says a model produces what its pipeline does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.settings import ModelSpec
from tests.service.conftest import SettingsFactory
from worker import resident


@pytest.fixture(scope="module")
def t2v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from selfcascade.tiny_models import save_tiny_text_to_video

    return save_tiny_text_to_video(tmp_path_factory.mktemp("t2v") / "tiny-t2v")


def spec(path: Path, **fields: object) -> ModelSpec:
    return ModelSpec(name="clips", path=str(path), native_width=64, native_height=64, **fields)


def test_a_video_model_is_resident_with_its_modality(
    settings_for: SettingsFactory, t2v_dir: Path
) -> None:
    [model] = resident.load_models([spec(t2v_dir)], settings_for()).values()
    assert model.spec.produces == "video" and model.engine.produces_video


def test_a_models_file_that_misnames_the_modality_stops_the_worker(
    settings_for: SettingsFactory, t2v_dir: Path, tiny_model_dir: Path
) -> None:
    with pytest.raises(ValueError, match=r"says it produces image.*holds a video pipeline"):
        resident.load_models([spec(t2v_dir, produces="image")], settings_for())
    with pytest.raises(ValueError, match=r"says it produces video.*holds an image pipeline"):
        resident.load_models([spec(tiny_model_dir, produces="video")], settings_for())


def test_a_models_file_allowing_more_frames_than_the_motion_module_stops_the_worker(
    settings_for: SettingsFactory, tmp_path: Path
) -> None:
    from selfcascade.tiny_models import save_tiny_animatediff

    path = save_tiny_animatediff(tmp_path / "tiny-animatediff")  # motion module: 32 frames
    with pytest.raises(ValueError, match=r'at most 32 frames.*"max_num_frames": 32'):
        resident.load_models([spec(path)], settings_for())  # the default allows 64
    [model] = resident.load_models([spec(path, max_num_frames=32)], settings_for()).values()
    assert model.engine.max_num_frames == 32
