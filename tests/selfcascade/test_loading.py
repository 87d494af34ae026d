from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline

from selfcascade.errors import ModelLoadError
from selfcascade.loading import load_pipeline, resolve_dtype
from selfcascade.tiny_models import save_tiny_sd


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny")


def test_a_saved_folder_loads_as_a_stock_pipeline(tiny_folder: Path) -> None:
    pipe = load_pipeline(str(tiny_folder), device="cpu")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.dtype == resolve_dtype("auto", pipe.device)


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no model folder"):
        load_pipeline(str(tmp_path / "nope"))


def test_folder_without_model_index_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model_index\.json is missing"):
        load_pipeline(str(tmp_path))


def test_unknown_dtype_is_a_clear_error(tiny_folder: Path) -> None:
    with pytest.raises(ModelLoadError, match="dtype"):
        load_pipeline(str(tiny_folder), dtype="float8")


def test_a_hub_id_that_cannot_be_reached_is_a_model_load_error() -> None:
    with pytest.raises(ModelLoadError, match="could not load"):
        load_pipeline("selfcascade-tests/does-not-exist", local_files_only=True)
