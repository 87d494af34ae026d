"""The self-cascade sampler, assembled from stock diffusers pipelines.

Stage 1 is ordinary text-to-image at the base size. Every later stage takes the previous stage's
clean latent (the pivot), upsamples it, and hands it to diffusers' own img2img pipeline as an
already-encoded 4-channel latent: img2img re-noises it to the pivot timestep with the scheduler's
`add_noise` and denoises it with the same frozen UNet. Nothing of diffusers is copied or forked;
all pipelines share the resident components of the one loaded model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

from selfcascade.cascade_engine import CascadeEngine, StagedResult
from selfcascade.cuda_graphs import DEFAULT_CUDA_GRAPH_MAX_PIXELS
from selfcascade.errors import ModelLoadError
from selfcascade.plan import StageSize
from selfcascade.progress import CancelToken, ProgressCallback
from selfcascade.request import GenerationRequest
from selfcascade.stage_hooks import StageHook
from selfcascade.stage_runtime import (
    DEFAULT_TILED_DECODE_ABOVE_PIXELS,
    StepReporter,
    vae_tiling_above,
)

log = logging.getLogger(__name__)

@dataclass(frozen=True, kw_only=True)
class GenerationResult(StagedResult):
    images: list[PIL.Image.Image]


class SelfCascadePipeline(CascadeEngine):
    """Self-cascade (tuning-free, or tuned through stage hooks) over a loaded SD or SDXL pipeline.

    Holds views of the one resident pipeline, so it runs one generation at a time: a worker
    process serves its jobs sequentially.
    """

    def __init__(
        self,
        pipe: StableDiffusionPipeline | StableDiffusionXLPipeline,
        *,
        tiled_decode_above_pixels: int | None = DEFAULT_TILED_DECODE_ABOVE_PIXELS,
        cuda_graph_max_pixels: int | None = DEFAULT_CUDA_GRAPH_MAX_PIXELS,
        compile_backend: str | None = None,
    ) -> None:
        if isinstance(pipe, StableDiffusionXLPipeline):
            self._img2img_cls: Any = StableDiffusionXLImg2ImgPipeline
        elif isinstance(pipe, StableDiffusionPipeline):
            self._img2img_cls = StableDiffusionImg2ImgPipeline
        else:
            raise ModelLoadError(f"unsupported pipeline {type(pipe).__name__}")
        super().__init__(
            pipe,
            renoise_cls=self._img2img_cls,
            tiled_decode_above_pixels=tiled_decode_above_pixels,
            cuda_graph_max_pixels=cuda_graph_max_pixels,
            compile_backend=compile_backend,
        )

    @property
    def is_sdxl(self) -> bool:
        return self._img2img_cls is StableDiffusionXLImg2ImgPipeline

    def generate(
        self,
        request: GenerationRequest,
        *,
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        stage_hooks: Sequence[StageHook] = (),
    ) -> GenerationResult:
        run = self._run_stages(request, on_progress, cancel, stage_hooks)
        return GenerationResult(images=run.output, **run.timing)

    # -- stages ------------------------------------------------------------------------------

    def _job_kwargs(
        self, request: GenerationRequest, generator: torch.Generator, reporter: StepReporter
    ) -> dict[str, Any]:
        return {
            "guidance_scale": request.guidance_scale,
            "generator": generator,
            "callback_on_step_end": reporter,
            **self._encode_prompt(request),
        }

    def _run_first(
        self, request: GenerationRequest, size: StageSize, kwargs: dict[str, Any]
    ) -> Any:
        return self._first(
            height=size.height, width=size.width, num_inference_steps=request.steps, **kwargs
        ).images

    def _upsample(self, pivot: torch.Tensor, size: StageSize, mode: str) -> torch.Tensor:
        return upsample_latents(pivot, size, self.vae_factor, mode)

    def _run_renoise(
        self,
        request: GenerationRequest,
        size: StageSize,
        upsampled: torch.Tensor,
        kwargs: dict[str, Any],
    ) -> Any:
        return renoise_and_denoise(
            self._renoise, upsampled, strength=request.pivot_strength, steps=request.steps,
            **kwargs,
        )

    def _decode_context(
        self, request: GenerationRequest, size: StageSize
    ) -> AbstractContextManager[None]:
        return vae_tiling_above(self.pipe.vae, size.pixels, self.tiled_decode_above_pixels)

    # -- conditioning ------------------------------------------------------------------------

    def _encode_prompt(self, request: GenerationRequest) -> dict[str, torch.Tensor | None]:
        """Prompt embeddings, computed once per job and passed to every stage."""
        pipe = self.pipe
        cfg = request.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
        if self.is_sdxl:
            pe, npe, pooled, npooled = pipe.encode_prompt(
                prompt=request.prompt,
                device=pipe.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=cfg,
                negative_prompt=request.negative_prompt,
            )
            return {
                "prompt_embeds": pe,
                "negative_prompt_embeds": npe,
                "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": npooled,
            }
        pe, npe = pipe.encode_prompt(
            request.prompt,
            pipe.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=request.negative_prompt,
        )
        return {"prompt_embeds": pe, "negative_prompt_embeds": npe}

    def _stage_kwargs(self, size: StageSize) -> dict[str, Any]:
        """SDXL's micro-conditioning: each stage is a native, uncropped image of its own size."""
        if not self.is_sdxl:
            return {}
        hw = (size.height, size.width)
        return {"original_size": hw, "target_size": hw, "crops_coords_top_left": (0, 0)}


def renoise_and_denoise(
    img2img: Any, latents: torch.Tensor, *, strength: float, steps: int, **kwargs: Any
) -> Any:
    """One pivot-replacement stage: diffusers img2img with an already-encoded latent as image.

    img2img recognises a 4-channel tensor as latents (no VAE encode, no second scaling), noises
    it with `scheduler.add_noise` to the timestep that `strength` selects and denoises to 0.
    """
    return img2img(image=latents, strength=strength, num_inference_steps=steps, **kwargs).images


def upsample_latents(
    latents: torch.Tensor, size: StageSize, vae_factor: int, mode: str = "bilinear"
) -> torch.Tensor:
    """Resize a clean latent (B, C, h, w) to the latent grid of `size`."""
    target = (size.height // vae_factor, size.width // vae_factor)
    resized = F.interpolate(latents.float(), size=target, mode=mode, align_corners=False)
    return resized.to(latents.dtype)  # (B, C, H, W)
