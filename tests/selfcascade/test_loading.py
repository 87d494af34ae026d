import socket
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn

import pytest
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

from selfcascade.errors import ModelLoadError
from selfcascade.loading import folder_variants, load_pipeline, resolve_dtype
from selfcascade.tiny_models import build_tiny_sd_pipeline, save_tiny_sd


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


@pytest.fixture(scope="module")
def fp16_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Saved as the hub's SDXL repositories save their half-precision files: *.fp16.*"""
    folder = tmp_path_factory.mktemp("models") / "tiny-fp16"
    build_tiny_sd_pipeline(0).save_pretrained(folder, safe_serialization=True, variant="fp16")
    return folder


@pytest.mark.parametrize(
    ("names", "variants"),
    [
        (["diffusion_pytorch_model.safetensors"], {None}),
        (["diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin"],
         {"fp16", None}),
        # Sharded: the variant before the shard number (diffusers and transformers today)...
        ([f"diffusion_pytorch_model.fp16-0000{i}-of-00002.safetensors" for i in (1, 2)],
         {"fp16"}),
        # ... or after it (their earlier order), and a plain sharded set.
        ([f"diffusion_pytorch_model-0000{i}-of-00002.fp16.safetensors" for i in (1, 2)],
         {"fp16"}),
        ([f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)], {None}),
        (["diffusion_pytorch_model.safetensors.index.fp16.json", "config.json"], set()),
    ],
)
def test_the_variants_of_a_folder_are_read_from_its_weight_file_names(
    tmp_path: Path, names: list[str], variants: set[str | None]
) -> None:
    for name in names:
        (tmp_path / "unet").mkdir(exist_ok=True)
        (tmp_path / "unet" / name).touch()
    assert folder_variants(tmp_path) == variants


def test_a_variant_folder_loads_with_its_variant_and_says_which_without(
    fp16_folder: Path, tiny_folder: Path
) -> None:
    assert folder_variants(fp16_folder) == {"fp16"}
    assert folder_variants(tiny_folder) == {None}
    pipe = load_pipeline(str(fp16_folder), device="cpu", variant="fp16")
    assert isinstance(pipe, StableDiffusionPipeline)
    # Without it, diffusers names a .bin file that was never meant to be there; the error says
    # what the folder holds and how to ask for it, in place of that.
    with pytest.raises(ModelLoadError) as refused:
        load_pipeline(str(fp16_folder), device="cpu")
    assert str(refused.value) == (
        f"could not load model {str(fp16_folder)!r}: no variant was asked for, but its weights "
        "are saved as the variant 'fp16': give it (--variant fp16, or \"variant\": \"fp16\" in a "
        "models file)"
    )
    with pytest.raises(ModelLoadError) as refused:
        load_pipeline(str(tiny_folder), device="cpu", variant="fp16")
    assert str(refused.value).endswith(
        ": the variant 'fp16' was asked for, but its weights are saved without one: leave the "
        "variant out"
    )


def test_unknown_dtype_is_a_clear_error(tiny_folder: Path) -> None:
    with pytest.raises(ModelLoadError, match="dtype"):
        load_pipeline(str(tiny_folder), dtype="float8")


def test_a_hub_id_that_cannot_be_reached_is_a_model_load_error() -> None:
    with pytest.raises(ModelLoadError) as caught:
        load_pipeline("selfcascade-tests/does-not-exist", local_files_only=True)
    assert str(caught.value) == (
        "no local folder at 'selfcascade-tests/does-not-exist', and loading it as a hub id "
        "failed: it is not in the local cache, and downloading was not allowed"
    )


def test_neither_a_folder_nor_a_hub_id_says_both() -> None:
    with pytest.raises(ModelLoadError, match="no local folder at 'a/b/c', and it is not a hub id"):
        load_pipeline("a/b/c")


class ClientConnectError(Exception):
    """An HTTP client's own connection error (httpx's, requests'), not an OSError."""


def http_404() -> Any:
    return SimpleNamespace(headers={}, request=None)  # all HfHubHTTPError reads of a response


def unreachable() -> BaseException:
    try:
        raise socket.gaierror(-2, "Name or service not known")
    except socket.gaierror as exc:
        try:
            raise ClientConnectError("[Errno -2] Name or service not known") from exc
        except ClientConnectError as wrapped:
            return wrapped


def diffusers_wrapping(cause: BaseException) -> Callable[..., NoReturn]:
    """from_pretrained as diffusers 0.42 fails when the Hub did not answer: a paragraph that
    points at a stack trace, raised from what the Hub said."""

    def from_pretrained(*args: object, **kwargs: object) -> NoReturn:
        raise OSError(
            "Cannot load model x/y: the model is not fully cached locally (...) and an error "
            "occurred while trying to fetch metadata from the Hub. Please check out the root "
            "cause in the stacktrace above."
        ) from cause

    return from_pretrained


@pytest.mark.parametrize(
    ("cause", "reason"),
    [
        (OfflineModeIsEnabled("offline"), "offline mode is on (HF_HUB_OFFLINE)"),
        (RepositoryNotFoundError("404", response=http_404()), "no such repository on the Hub"),
        (GatedRepoError("403", response=http_404()), "it is gated"),
        (unreachable(), "the Hub cannot be reached ([Errno -2] Name or service not known)"),
    ],
)
def test_a_hub_id_that_does_not_load_says_why_in_one_short_line(
    monkeypatch: pytest.MonkeyPatch, cause: BaseException, reason: str
) -> None:
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", diffusers_wrapping(cause))
    with pytest.raises(ModelLoadError) as caught:
        load_pipeline("x/y", device="cpu")
    message = str(caught.value)
    assert message.startswith("no local folder at 'x/y', and loading it as a hub id failed: ")
    assert reason in message
    assert "stacktrace" not in message and len(message) < 160
