"""The demo model's components: an SD-shaped pipeline small enough to train on a CPU.

Native size 64 px. The VAE downsamples by 4 (latents 16 x 16 x 4, SD's 4 channels, which the
self-cascade engine needs), so the UNet works on a 16 x 16 grid: cheap enough on two cores, and
three UNet levels (16, 8, 4) make the engine's stage multiple 16 px (64 -> 128 -> 256).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from selfcascade.demo.card import NATIVE_SIZE
from selfcascade.tiny_models import assemble_sd_pipeline

VAE_FACTOR = 4
TEXT_HIDDEN = 64

# SD's training noise schedule, so pivot strength (K / T) means what it means for SD2.1.
NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=NATIVE_SIZE,
        # Attention over the latent grid would dominate decoding at 4x the native size.
        mid_block_add_attention=False,
    )


def build_unet(sample_size: int = NATIVE_SIZE // VAE_FACTOR) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        # Text attention at 8 x 8 and 4 x 4 (and the mid block), where the layout is decided;
        # the 16 x 16 level only draws edges, and attention there would double the step time.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
        projection_dim=TEXT_HIDDEN,
    )
    return CLIPTextModel(config)


def build_training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**NOISE_SCHEDULE)


def build_sampling_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**NOISE_SCHEDULE, set_alpha_to_one=False, steps_offset=1)


def assemble_pipeline(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
) -> StableDiffusionPipeline:
    return assemble_sd_pipeline(unet, vae, text_encoder, tokenizer, build_sampling_scheduler())


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
