"""Tiny Stable Diffusion, SDXL, text-to-video and AnimateDiff pipelines built from configs, with
random weights.

No model hub is reachable from the machines this project is developed and tested on, so tests,
`make run` (until a trained demo model is configured) and benchmarks build these instead, the way
diffusers' own tests do (`get_dummy_components`, channels (4, 8)). The tokenizer is a byte-level
CLIP BPE with no merges, written from scratch: every character is one token.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKL,
    DDIMScheduler,
    MotionAdapter,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    TextToVideoSDPipeline,
    UNet2DConditionModel,
    UNet3DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

TEXT_HIDDEN = 32


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for raw bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + n)
            n += 1
    return [chr(c) for c in codes]


def build_char_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is single characters (no merges)."""
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        # from_pretrained reads vocab.json + merges.txt under transformers 4.x and 5.x alike.
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)
    return tokenizer


def _text_config(tokenizer: CLIPTokenizer, projection_dim: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu",
        projection_dim=projection_dim or TEXT_HIDDEN,
    )


def _tiny_vae() -> AutoencoderKL:
    # Two blocks: one downsampling, so the VAE factor is 2 and latents stay 4-channel like SD's.
    return AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
        sample_size=64,
        # Full attention over the latent grid dominates CPU time at a few hundred pixels.
        mid_block_add_attention=False,
    )


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _tiny_unet(**family: object) -> UNet2DConditionModel:
    """Two levels of 4 and 8 channels (diffusers' own test size); `family` adds SD or SDXL bits."""
    return UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=2,
        **family,
    )


def build_tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """An SD-1.x/2.x-shaped pipeline, native size 64x64 px (latent 32, VAE factor 2)."""
    torch.manual_seed(seed)
    unet = _tiny_unet(cross_attention_dim=TEXT_HIDDEN)
    tokenizer = build_char_tokenizer()
    return assemble_sd_pipeline(
        unet, _tiny_vae(), CLIPTextModel(_text_config(tokenizer)), tokenizer, _scheduler()
    )


def assemble_sd_pipeline(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    scheduler: object,
) -> StableDiffusionPipeline:
    """A stock StableDiffusionPipeline from our own components, without a safety checker (the
    models built here have no NSFW classifier to pair with)."""
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """An SDXL-shaped pipeline (two text encoders, added size conditioning), native 64x64 px."""
    torch.manual_seed(seed)
    unet = _tiny_unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
        cross_attention_dim=64,
    )
    vae = _tiny_vae()
    tokenizer = build_char_tokenizer()
    tokenizer_2 = build_char_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, projection_dim=32))
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def save_tiny_sd(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny SD pipeline folder that `StableDiffusionPipeline.from_pretrained` loads."""
    path = Path(path)
    build_tiny_sd_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path


# -- video ---------------------------------------------------------------------------------------


def _tiny_unet_3d() -> UNet3DConditionModel:
    """ModelScope text-to-video's UNet at diffusers' test size: 4 and 8 channels, two levels."""
    return UNet3DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=2,
        norm_num_groups=2,
    )


def build_tiny_text_to_video_pipeline(seed: int = 0) -> TextToVideoSDPipeline:
    """A `TextToVideoSDPipeline` (UNet3DConditionModel), native 64x64 px (latent 32, VAE 2)."""
    torch.manual_seed(seed)
    unet = _tiny_unet_3d()
    tokenizer = build_char_tokenizer()
    return TextToVideoSDPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
    )


def build_tiny_animatediff_pipeline(seed: int = 0) -> AnimateDiffPipeline:
    """An `AnimateDiffPipeline`: the tiny SD UNet plus a tiny motion adapter, native 64x64 px.

    The pipeline merges the two into a `UNetMotionModel` when it is built, as it does for
    SD1.5 + a released motion adapter.
    """
    torch.manual_seed(seed)
    unet = _tiny_unet(cross_attention_dim=TEXT_HIDDEN)
    adapter = MotionAdapter(
        block_out_channels=(4, 8),
        motion_layers_per_block=1,
        motion_norm_num_groups=2,
        motion_num_attention_heads=2,
        motion_max_seq_length=32,
    )
    tokenizer = build_char_tokenizer()
    return AnimateDiffPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer)),
        tokenizer=tokenizer,
        unet=unet,
        motion_adapter=adapter,
        scheduler=_scheduler(),
        feature_extractor=None,
        image_encoder=None,
    )


def save_tiny_text_to_video(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny text-to-video pipeline folder that `load_pipeline` loads."""
    path = Path(path)
    build_tiny_text_to_video_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_animatediff(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny AnimateDiff pipeline folder that `load_pipeline` loads."""
    path = Path(path)
    build_tiny_animatediff_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path
