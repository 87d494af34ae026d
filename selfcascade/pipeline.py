"""The self-cascade sampler, assembled from stock diffusers pipelines.

Stage 1 is ordinary text-to-image at the base size. Every later stage takes the previous stage's
clean latent (the pivot), upsamples it, and hands it to diffusers' own img2img pipeline as an
already-encoded 4-channel latent: img2img re-noises it to the pivot timestep with the scheduler's
`add_noise` and denoises it with the same frozen UNet. Nothing of diffusers is copied or forked;
all pipelines share the resident components of the one loaded model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from selfcascade.cascade_engine import CascadeEngine, StagedResult
from selfcascade.errors import GenerationCancelled, InvalidRequest, ModelLoadError
from selfcascade.plan import StageSize
from selfcascade.progress import CancelToken, Progress, ProgressCallback
from selfcascade.request import GenerationRequest
from selfcascade.stage_hooks import StageHook

log = logging.getLogger(__name__)

# Above this many output pixels the VAE decodes in tiles: an SD VAE decode at 4096^2 needs
# ~38 GiB in one piece and ~1 GiB tiled (shared/GPU.md); at 2048^2 one piece still fits.
DEFAULT_TILED_DECODE_ABOVE_PIXELS = 2048 * 2048


@dataclass(frozen=True, kw_only=True)
class GenerationResult(StagedResult):
    images: list[PIL.Image.Image]


@dataclass(frozen=True)
class _Conditioning:
    """Prompt embeddings computed once per job and reused by every stage."""

    kwargs: dict[str, torch.Tensor | None]


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
        sizes = self.validate(request)
        steps = self.stage_steps(request, len(sizes))
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        # Schedulers are stateful: each job gets its own, shared by its stages.
        scheduler = make_scheduler(request.scheduler, self._scheduler_config)
        txt2img, img2img = self._first, self._renoise
        txt2img.scheduler = img2img.scheduler = scheduler
        reporter = StepReporter(steps, on_progress, cancel, sizes)
        seconds: list[float] = []

        with (
            torch.inference_mode(),
            count_calls(self.pipe.unet) as unet_calls,
            module_dtype_restored(self.pipe.vae),
        ):
            conditioning = self._encode_prompt(request)
            latents: torch.Tensor | None = None
            for index, size in enumerate(sizes, start=1):
                last = index == len(sizes)
                reporter.begin_stage(index)
                started = time.perf_counter()
                # What every stage passes to diffusers, whichever pipeline runs it.
                call = {
                    "guidance_scale": request.guidance_scale,
                    "generator": generator,
                    "output_type": "pil" if last else "latent",
                    "callback_on_step_end": reporter,
                    **conditioning.kwargs,
                    **self._size_conditioning(size),
                }
                with self._tiled_decode(size if last else None):
                    if latents is None:
                        output = txt2img(
                            height=size.height,
                            width=size.width,
                            num_inference_steps=request.steps,
                            **call,
                        ).images
                    else:
                        output = self._renoise_stage(
                            img2img, request, index, sizes, latents, stage_hooks, call
                        )
                synchronize_device(self.pipe.device)
                seconds.append(time.perf_counter() - started)
                log.debug("stage %d/%d %s took %.3fs", index, len(sizes), size, seconds[-1])
                if last:
                    images = output
                else:
                    latents = output
        return GenerationResult(
            images=images,
            seed=request.seed,
            stages=sizes,
            stage_seconds=seconds,
            unet_evaluations=unet_calls[0],
            stage_steps=steps,
        )

    # -- stages ------------------------------------------------------------------------------

    def _renoise_stage(
        self,
        img2img: Any,
        request: GenerationRequest,
        index: int,
        sizes: list[StageSize],
        pivot: torch.Tensor,
        stage_hooks: Sequence[StageHook],
        call: dict[str, Any],
    ) -> Any:
        size = sizes[index - 1]
        upsampled = upsample_latents(pivot, size, self.vae_factor, request.upsample_mode)
        with self._stage_hooks_entered(request, index, sizes, pivot, upsampled, stage_hooks):
            return renoise_and_denoise(
                img2img, upsampled, strength=request.pivot_strength, steps=request.steps, **call
            )

    # -- conditioning ------------------------------------------------------------------------

    def _encode_prompt(self, request: GenerationRequest) -> _Conditioning:
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
            return _Conditioning(
                {
                    "prompt_embeds": pe,
                    "negative_prompt_embeds": npe,
                    "pooled_prompt_embeds": pooled,
                    "negative_pooled_prompt_embeds": npooled,
                }
            )
        pe, npe = pipe.encode_prompt(
            request.prompt,
            pipe.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=request.negative_prompt,
        )
        return _Conditioning({"prompt_embeds": pe, "negative_prompt_embeds": npe})

    def _size_conditioning(self, size: StageSize) -> dict[str, Any]:
        """SDXL's micro-conditioning: each stage is a native, uncropped image of its own size."""
        if not self.is_sdxl:
            return {}
        hw = (size.height, size.width)
        return {"original_size": hw, "target_size": hw, "crops_coords_top_left": (0, 0)}

    def _tiled_decode(self, final_size: StageSize | None) -> AbstractContextManager[None]:
        pixels = None if final_size is None else final_size.pixels
        return vae_tiling_above(self.pipe.vae, pixels, self.tiled_decode_above_pixels)


@contextmanager
def vae_tiling_above(vae: Any, pixels: int | None, threshold: int | None) -> Iterator[None]:
    """VAE tiling on while decoding `pixels` at once exceeds `threshold` (None: never), then off
    again, unless the caller had turned it on for good."""
    wanted = pixels is not None and threshold is not None and pixels > threshold
    if not wanted or getattr(vae, "use_tiling", False):
        yield
        return
    vae.enable_tiling()
    try:
        yield
    finally:
        vae.disable_tiling()


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


def make_scheduler(name: str, config: Any) -> SchedulerMixin:
    """A fresh scheduler configured from the model's own scheduler config."""
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    raise InvalidRequest("scheduler", f"unknown scheduler {name!r}")


class StepReporter:
    """diffusers' `callback_on_step_end`: reports progress and stops the run when cancelled."""

    def __init__(
        self,
        steps: list[int],
        on_progress: ProgressCallback | None,
        cancel: CancelToken | None,
        sizes: Sequence[StageSize] = (),
    ) -> None:
        self.steps = steps
        self.sizes = list(sizes)
        self.total = sum(steps)
        self.on_progress = on_progress
        self.cancel = cancel
        self.stage = 0
        self.done_before_stage = 0

    def begin_stage(self, stage: int) -> None:
        if self.stage:
            self.done_before_stage += self.steps[self.stage - 1]
        self.stage = stage
        self._check_cancel(step=0)

    def __call__(
        self, pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        step = step_index + 1
        if self.on_progress is not None:
            done = self.done_before_stage + step
            size = self.sizes[self.stage - 1] if self.sizes else None
            self.on_progress(
                Progress(
                    stage=self.stage,
                    stages=len(self.steps),
                    step=step,
                    steps=self.steps[self.stage - 1],
                    fraction=done / self.total,
                    width=size.width if size else None,
                    height=size.height if size else None,
                )
            )
        self._check_cancel(step)
        return callback_kwargs

    def _check_cancel(self, step: int) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise GenerationCancelled(self.stage, step)


@contextmanager
def count_calls(module: torch.nn.Module) -> Iterator[list[int]]:
    """Count forward calls of `module` (one UNet evaluation = one batched CFG call)."""
    count = [0]

    def hook(*_: Any) -> None:
        count[0] += 1

    handle = module.register_forward_pre_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


@contextmanager
def module_dtype_restored(module: torch.nn.Module) -> Iterator[None]:
    """Put `module` back in its dtype however the run ends.

    diffusers' SDXL pipelines upcast a `force_upcast` fp16 VAE to fp32 for the decode and cast
    it back afterwards, without a `finally`: an out-of-memory error in that decode would leave
    the resident VAE in fp32 and break every later job of the worker.
    """
    dtype = next(module.parameters()).dtype
    try:
        yield
    finally:
        if next(module.parameters()).dtype != dtype:
            log.warning("restoring %s to %s after an interrupted run", type(module).__name__, dtype)
            module.to(dtype=dtype)


def synchronize_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
