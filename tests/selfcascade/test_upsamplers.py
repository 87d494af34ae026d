"""Feature upsamplers: shapes and levels from UNet configs, zero output until trained."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from selfcascade.upsamplers import (
    FeatureUpsampler,
    FeatureUpsamplerSet,
    UpsamplerSetConfig,
    count_parameters,
)

SD21_BASE_UNET = {
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_num_groups": 32,
}
SDXL_UNET = {
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "norm_num_groups": 32,
}


def test_levels_follow_the_tiny_unet_config(tiny_sd: Any) -> None:
    config = UpsamplerSetConfig.from_unet_config(tiny_sd.unet.config)
    assert [(lv.name, lv.channels) for lv in config.levels] == [
        ("down_0", 4),
        ("down_1", 8),
        ("mid", 8),
    ]
    # The width of the UNet's own time MLP output, which is what blocks receive as temb.
    assert config.temb_channels == tiny_sd.unet.time_embedding.linear_2.out_features


def test_real_configs_give_down_blocks_plus_mid() -> None:
    sd = UpsamplerSetConfig.from_unet_config(SD21_BASE_UNET)
    xl = UpsamplerSetConfig.from_unet_config(SDXL_UNET)
    assert [lv.channels for lv in sd.levels] == [320, 640, 1280, 1280, 1280]
    assert [lv.channels for lv in xl.levels] == [320, 640, 1280, 1280]
    assert sd.temb_channels == xl.temb_channels == 1280
    assert count_parameters(xl) > 0


def test_level_subset_and_unknown_level() -> None:
    config = UpsamplerSetConfig.from_unet_config(SDXL_UNET, levels=("down_2", "mid"))
    assert [lv.name for lv in config.levels] == ["down_2", "mid"]
    with pytest.raises(ValueError, match="down_7"):
        UpsamplerSetConfig.from_unet_config(SDXL_UNET, levels=("down_7",))


def test_untrained_upsampler_outputs_exact_zeros_at_the_requested_size() -> None:
    phi = FeatureUpsampler(channels=8, temb_channels=16, groups=2)
    lr = torch.randn(2, 8, 5, 7)
    out = phi(lr, torch.randn(2, 16), (9, 13))  # less than 2x: sizes follow the HR feature
    assert out.shape == (2, 8, 9, 13)
    assert torch.count_nonzero(out) == 0


def test_trained_upsampler_depends_on_timestep_embedding() -> None:
    torch.manual_seed(0)
    phi = FeatureUpsampler(channels=8, temb_channels=16, groups=2)
    for p in phi.parameters():
        torch.nn.init.normal_(p, std=0.2)
    lr = torch.randn(1, 8, 4, 4)
    a = phi(lr, torch.zeros(1, 16), (8, 8))
    b = phi(lr, torch.ones(1, 16), (8, 8))
    assert not torch.allclose(a, b)


def test_config_round_trips_through_a_dict(tiny_sdxl: Any) -> None:
    config = FeatureUpsamplerSet.for_unet(tiny_sdxl.unet.config).config
    assert UpsamplerSetConfig.from_dict(config.to_dict()) == config
