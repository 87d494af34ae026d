"""Time-aware feature upsamplers phi_n: the only weights the tuned self-cascade learns.

One `FeatureUpsampler` per UNet feature level (each down block's output and the mid block's).
It carries the pivot's low-resolution features h_n^LR to the high-resolution pass of the next
stage, where the injection hooks (`selfcascade.tuned`) add its output to the block output:
h_n^HR + phi_n(h_n^LR, t). Architecture as in the paper: bilinear upsampling, then two residual
blocks conditioned on the UNet's timestep embedding; plus a zero-initialised 1x1 output
convolution so that an untrained set adds exactly zero and the tuned path starts as the
tuning-free one (the official code zero-inits inside the residual blocks instead, which makes an
untrained upsampler an identity copy of the LR features, not a no-op).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURE = "bilinear+2x(time-resblock)+zero-conv1x1/v1"


@dataclass(frozen=True)
class UpsamplerLevel:
    """One feature level the set covers: `name` is "down_<i>" or "mid"."""

    name: str
    channels: int


@dataclass(frozen=True)
class UpsamplerSetConfig:
    """Everything needed to rebuild a set with the same parameter shapes."""

    levels: tuple[UpsamplerLevel, ...]
    temb_channels: int
    norm_groups: int
    architecture: str = ARCHITECTURE

    @classmethod
    def from_unet_config(
        cls, config: Mapping[str, Any], levels: tuple[str, ...] | None = None
    ) -> UpsamplerSetConfig:
        """Levels and channels of an SD1.x/2.x/SDXL `UNet2DConditionModel` config.

        The default covers every down block plus the mid block (4 + 1 for SD2.1, 3 + 1 for SDXL).
        """
        channels = [int(c) for c in config["block_out_channels"]]
        n_down = len(config["down_block_types"])
        available: dict[str, int] = {f"down_{i}": channels[i] for i in range(n_down)}
        if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
            available["mid"] = channels[-1]
        names = tuple(available) if levels is None else levels
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"unknown feature levels {unknown}; this UNet has {list(available)}")
        # The UNet's time MLP output width, which is what its blocks receive as `temb`.
        temb = config.get("time_embedding_dim") or channels[0] * 4
        return cls(
            levels=tuple(UpsamplerLevel(n, available[n]) for n in names),
            temb_channels=int(temb),
            norm_groups=int(config.get("norm_num_groups") or 32),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UpsamplerSetConfig:
        return cls(
            levels=tuple(
                UpsamplerLevel(str(lv["name"]), int(lv["channels"])) for lv in data["levels"]
            ),
            temb_channels=int(data["temb_channels"]),
            norm_groups=int(data["norm_groups"]),
            architecture=str(data["architecture"]),
        )


class TimeResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected timestep embedding, twice, with a skip."""

    def __init__(self, channels: int, temb_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.time_proj = nn.Linear(temb_channels, channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C, H, W)
        h = h + self.time_proj(F.silu(temb))[:, :, None, None]  # (B, C, H, W) + (B, C, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C, H, W)
        return x + h


class FeatureUpsampler(nn.Module):
    """phi_n(h^LR, t): upsample LR features to the HR feature size; zero until trained."""

    def __init__(self, channels: int, temb_channels: int, groups: int) -> None:
        super().__init__()
        self.block1 = TimeResBlock(channels, temb_channels, groups)
        self.block2 = TimeResBlock(channels, temb_channels, groups)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        if self.out.bias is not None:
            nn.init.zeros_(self.out.bias)

    def forward(
        self, lr_features: torch.Tensor, temb: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        # To the HR feature's exact size rather than a fixed 2x: stages may grow less than 2x per
        # side, and odd latent sizes make the down blocks round.
        x = F.interpolate(
            lr_features, size=size, mode="bilinear", align_corners=False
        )  # (B, C, H, W)
        x = self.block1(x, temb)  # (B, C, H, W)
        x = self.block2(x, temb)  # (B, C, H, W)
        return self.out(x)  # (B, C, H, W)


class FeatureUpsamplerSet(nn.Module):
    """One `FeatureUpsampler` per level, keyed by level name ("down_0", ..., "mid")."""

    def __init__(self, config: UpsamplerSetConfig) -> None:
        super().__init__()
        self.config = config
        self.levels = nn.ModuleDict(
            {
                lv.name: FeatureUpsampler(lv.channels, config.temb_channels, config.norm_groups)
                for lv in config.levels
            }
        )

    @classmethod
    def for_unet(
        cls, unet_config: Mapping[str, Any], levels: tuple[str, ...] | None = None
    ) -> FeatureUpsamplerSet:
        return cls(UpsamplerSetConfig.from_unet_config(unet_config, levels))

    @classmethod
    def random_for_unet(
        cls, unet_config: Mapping[str, Any], *, std: float = 0.02, seed: int = 0
    ) -> FeatureUpsamplerSet:
        """A set with small random weights everywhere, for benchmarks and tests: trained sets
        start their output layers at zero (the identity), which would hide the cost and the
        effect of the injection. Speed does not depend on the values."""
        ups = cls.for_unet(unet_config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in ups.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return ups

    def __getitem__(self, name: str) -> FeatureUpsampler:
        module = self.levels[name]
        assert isinstance(module, FeatureUpsampler)
        return module

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.levels

    def names(self) -> Iterator[str]:
        return iter(self.levels.keys())

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def count_parameters(config: UpsamplerSetConfig) -> int:
    """Parameter count from shapes alone, without allocating (for multi-billion-scale configs)."""
    with torch.device("meta"):
        return FeatureUpsamplerSet(config).parameter_count()
