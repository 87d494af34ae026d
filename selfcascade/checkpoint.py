"""Upsampler checkpoints: only the phi_n weights, as safetensors, with enough metadata to refuse
a wrong base model before any job runs.

Base-model identity has two parts:
- `base_config_sha256`: SHA-256 of the UNet config as canonical JSON (keys starting with "_",
  such as the path it was loaded from or the diffusers version, are left out);
- `base_weights_probe`: the float64 sum of |w| of up to 64 weight tensors spread over the
  UNet's state dict. A sum of absolute values moves by at most the dtype's relative rounding
  (2^-9 for bfloat16), so the same model served in float16/bfloat16 still matches, while
  another checkpoint of the same architecture does not. A fine-tune that barely moves the
  weights would pass; that is accepted (the upsamplers read the same features).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from selfcascade.errors import CheckpointError
from selfcascade.folders import replace_file
from selfcascade.upsamplers import FeatureUpsamplerSet, UpsamplerSetConfig

# A diffusers UNet2DConditionModel; mypy cannot see the attributes diffusers' classes set.
UNet = Any

FORMAT = "selfcascade-upsamplers"
FORMAT_VERSION = 1
PROBE_TENSORS = 64
# Relative tolerance on each probe value: above bfloat16's worst-case relative rounding (2^-9).
PROBE_RTOL = 4e-3


@dataclass(frozen=True)
class BaseModelIdentity:
    config_sha256: str
    weights_probe: tuple[float, ...]

    @classmethod
    def of(cls, unet: UNet) -> BaseModelIdentity:
        return cls(unet_config_sha256(unet), unet_weights_probe(unet))

    def mismatch(self, other: BaseModelIdentity) -> str | None:
        """Why `other` is not the same base model, or None when it is."""
        if self.config_sha256 != other.config_sha256:
            return (
                f"UNet config differs (checkpoint {self.config_sha256[:12]}, "
                f"model {other.config_sha256[:12]})"
            )
        if len(self.weights_probe) != len(other.weights_probe):
            return "UNet weight fingerprint has a different length"
        for i, (a, b) in enumerate(zip(self.weights_probe, other.weights_probe, strict=True)):
            if not math.isclose(a, b, rel_tol=PROBE_RTOL, abs_tol=1e-6):
                return f"UNet weights differ (fingerprint entry {i}: {a:.6g} vs {b:.6g})"
        return None


@dataclass(frozen=True)
class UpsamplerCheckpoint:
    """What `load_upsamplers` returns: the set, ready to use, and its metadata."""

    upsamplers: FeatureUpsamplerSet
    scale: float
    pivot_timestep: int
    parameter_count: int
    base: BaseModelIdentity
    # Side in pixels of the high-resolution crops it was tuned on: the stage it is made for.
    # None for checkpoints written before this was recorded.
    hr_size: int | None
    extra: dict[str, str]


def unet_config_sha256(unet: UNet) -> str:
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    canonical = json.dumps(config, sort_keys=True, default=_jsonable)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | set):
        return list(value)
    return repr(value)


def unet_weights_probe(unet: UNet) -> tuple[float, ...]:
    state = unet.state_dict()
    names = sorted(state)
    step = max(1, len(names) // PROBE_TENSORS)
    picked = names[::step][:PROBE_TENSORS]
    with torch.no_grad():
        return tuple(float(state[n].detach().double().abs().sum()) for n in picked)


def save_upsamplers(
    path: str | Path,
    upsamplers: FeatureUpsamplerSet,
    unet: UNet,
    scale: float,
    pivot_timestep: int,
    hr_size: int | None = None,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write the set's weights and metadata; atomic (a reader never sees half a file)."""
    path = Path(path)
    base = BaseModelIdentity.of(unet)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "base_config_sha256": base.config_sha256,
        "base_weights_probe": json.dumps(list(base.weights_probe)),
        "scale": repr(float(scale)),
        "pivot_timestep": str(int(pivot_timestep)),
        "architecture": json.dumps(upsamplers.config.to_dict()),
        "parameter_count": str(upsamplers.parameter_count()),
        **({"hr_size": str(int(hr_size))} if hr_size is not None else {}),
        **(extra or {}),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in upsamplers.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not safetensors' save_file: it creates the file 0600, and a checkpoint copied from there
    # into a read-only mount is then unreadable to a container running as another uid. Written
    # here, its mode follows the umask, like the run's loss log and training state.
    replace_file(path, safetensors_bytes(tensors, metadata=metadata))
    return path


def load_upsamplers(path: str | Path, unet: UNet) -> UpsamplerCheckpoint:
    """Load and verify a checkpoint against `unet`; raise `CheckpointError` on any mismatch."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"upsampler checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
    except Exception as exc:  # safetensors raises its own error types for corrupt/truncated files
        raise CheckpointError(
            f"upsampler checkpoint {path} is corrupt or truncated: {exc}"
        ) from exc

    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a selfcascade upsampler checkpoint")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path} has format version {version}; this build reads version {FORMAT_VERSION}"
        )
    try:
        saved = BaseModelIdentity(
            metadata["base_config_sha256"],
            tuple(float(x) for x in json.loads(metadata["base_weights_probe"])),
        )
        config = UpsamplerSetConfig.from_dict(json.loads(metadata["architecture"]))
        scale = float(metadata["scale"])
        pivot_timestep = int(metadata["pivot_timestep"])
        parameter_count = int(metadata["parameter_count"])
        hr_size = int(metadata["hr_size"]) if "hr_size" in metadata else None
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} has missing or malformed metadata: {exc}") from exc

    reason = saved.mismatch(BaseModelIdentity.of(unet))
    if reason:
        raise CheckpointError(f"{path} was trained for another base model: {reason}")
    expected = UpsamplerSetConfig.from_unet_config(
        unet.config, tuple(lv.name for lv in config.levels)
    )
    if config.architecture != expected.architecture:
        raise CheckpointError(
            f"{path} uses upsampler architecture {config.architecture!r}; "
            f"this build has {expected.architecture!r}"
        )
    if config != expected:
        raise CheckpointError(f"{path} upsampler shapes do not fit this UNet: {config}")

    upsamplers = FeatureUpsamplerSet(config)
    try:
        upsamplers.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} tensors do not match the architecture: {exc}") from exc
    if upsamplers.parameter_count() != parameter_count:
        raise CheckpointError(f"{path} parameter count disagrees with its metadata")
    known = {
        "format", "format_version", "base_config_sha256", "base_weights_probe", "scale",
        "pivot_timestep", "architecture", "parameter_count", "hr_size",
    }  # fmt: skip
    return UpsamplerCheckpoint(
        upsamplers=upsamplers,
        scale=scale,
        pivot_timestep=pivot_timestep,
        parameter_count=parameter_count,
        base=saved,
        hr_size=hr_size,
        extra={k: v for k, v in metadata.items() if k not in known},
    )
