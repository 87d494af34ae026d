"""The self-cascade sampler for text-to-video models, assembled from stock diffusers pipelines.

Two families: `TextToVideoSDPipeline` (ModelScope's UNet3DConditionModel) and
`AnimateDiffPipeline` (an SD UNet plus a motion adapter, run as a UNetMotionModel). The cascade
is spatial only: every stage keeps the clip's frames; stage 1 is the stock text-to-video run at
the base size, and every later stage upsamples the previous stage's clean 5-D latent frame by
frame (the pivot), re-noises it to the pivot timestep and denoises it at the larger size with the
same frozen UNet, through the family's own video-to-video pipeline:

- `VideoToVideoSDPipeline` takes an already-encoded 4-channel latent as its `video` (as the
  image img2img does) and re-noises it itself with `scheduler.add_noise`.
- `AnimateDiffVideoToVideoPipeline` always VAE-encodes `video`, so the pivot goes in as
  `latents=` instead, which that pipeline takes as already noised. The engine noises it first:
  the timestep comes from the pipeline's own `get_timesteps` (the same truncation its call then
  makes) and the noise from `randn_tensor` with the job's generator, as the pipeline would draw it.

Nothing of diffusers is copied; all pipelines share the resident components of the one model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
from diffusers import (
    AnimateDiffPipeline,
    AnimateDiffVideoToVideoPipeline,
    TextToVideoSDPipeline,
    VideoToVideoSDPipeline,
)
from diffusers.utils.torch_utils import randn_tensor

from selfcascade.cascade_engine import CascadeEngine, StagedResult
from selfcascade.errors import InvalidRequest, ModelLoadError
from selfcascade.pipeline import upsample_latents
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

# Frames when a request names none: diffusers' own default for both pipeline families.
DEFAULT_FRAMES = 16
# AnimateDiff decodes this many frames per VAE call (its own default); text-to-video all at once.
DECODE_CHUNK_FRAMES = 16


@dataclass(frozen=True, kw_only=True)
class VideoResult(StagedResult):
    frames: list[PIL.Image.Image]  # one clip, in order, each at the requested size


class VideoSelfCascadePipeline(CascadeEngine):
    """Self-cascade over a loaded `TextToVideoSDPipeline` or `AnimateDiffPipeline`.

    Same contract as `SelfCascadePipeline` (one generation at a time over views of the resident
    pipeline), but the result carries `frames`.
    """

    produces_video = True

    def __init__(
        self,
        pipe: TextToVideoSDPipeline | AnimateDiffPipeline,
        *,
        tiled_decode_above_pixels: int | None = DEFAULT_TILED_DECODE_ABOVE_PIXELS,
    ) -> None:
        if isinstance(pipe, AnimateDiffPipeline):
            renoise_cls: Any = AnimateDiffVideoToVideoPipeline
        elif isinstance(pipe, TextToVideoSDPipeline):
            renoise_cls = VideoToVideoSDPipeline
        else:
            raise ModelLoadError(f"unsupported video pipeline {type(pipe).__name__}")
        super().__init__(
            pipe,
            renoise_cls=renoise_cls,
            tiled_decode_above_pixels=tiled_decode_above_pixels,
            # Not measured on video UNets, whose every step carries all frames (rarely
            # launch-bound, and a graph would pin a whole clip's activations): always eager.
            cuda_graph_max_pixels=None,
        )

    @property
    def is_animatediff(self) -> bool:
        return isinstance(self.pipe, AnimateDiffPipeline)

    def num_frames(self, request: GenerationRequest) -> int:
        return DEFAULT_FRAMES if request.num_frames is None else request.num_frames

    @property
    def max_num_frames(self) -> int | None:
        """A motion module's positional embedding has a fixed length (32 in released adapters);
        more frames would fail deep inside diffusers. None: no such limit."""
        limit = getattr(self.pipe.unet.config, "motion_max_seq_length", None)
        return int(limit) if limit is not None else None

    def validate(self, request: GenerationRequest) -> list[StageSize]:
        sizes = super().validate(request)
        limit = self.max_num_frames
        if limit is not None and self.num_frames(request) > limit:
            raise InvalidRequest(
                "num_frames", f"this model's motion module takes at most {limit} frames"
            )
        return sizes

    def generate(
        self,
        request: GenerationRequest,
        *,
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        stage_hooks: Sequence[StageHook] = (),
    ) -> VideoResult:
        run = self._run_stages(request, on_progress, cancel, stage_hooks)
        return VideoResult(frames=list(run.output[0]), **run.timing)

    # -- stages ------------------------------------------------------------------------------

    def _job_kwargs(
        self, request: GenerationRequest, generator: torch.Generator, reporter: StepReporter
    ) -> dict[str, Any]:
        return {
            "guidance_scale": request.guidance_scale,
            "generator": generator,
            **self._encode_prompt(request),
            **self._progress_kwargs(reporter),
            **({"decode_chunk_size": DECODE_CHUNK_FRAMES} if self.is_animatediff else {}),
        }

    def _run_first(
        self, request: GenerationRequest, size: StageSize, kwargs: dict[str, Any]
    ) -> Any:
        return self._first(
            height=size.height,
            width=size.width,
            num_frames=self.num_frames(request),
            num_inference_steps=request.steps,
            **kwargs,
        ).frames

    def _upsample(self, pivot: torch.Tensor, size: StageSize, mode: str) -> torch.Tensor:
        return upsample_video_latents(pivot, size, self.vae_factor, mode)

    def _run_renoise(
        self,
        request: GenerationRequest,
        size: StageSize,
        upsampled: torch.Tensor,
        kwargs: dict[str, Any],
    ) -> Any:
        if self.is_animatediff:
            return self._renoise_animatediff(upsampled, size, request, kwargs)
        # (B, F, C, H, W): the frame-major layout VideoToVideoSDPipeline's `video` takes.
        return self._renoise(
            video=upsampled.permute(0, 2, 1, 3, 4),
            strength=request.pivot_strength,
            num_inference_steps=request.steps,
            **kwargs,
        ).frames

    def _decode_context(
        self, request: GenerationRequest, size: StageSize
    ) -> AbstractContextManager[None]:
        # The pixels one VAE call decodes: a chunk of frames for AnimateDiff, all of them else.
        frames = self.num_frames(request)
        at_once = min(frames, DECODE_CHUNK_FRAMES) if self.is_animatediff else frames
        return vae_tiling_above(
            self.pipe.vae, size.pixels * at_once, self.tiled_decode_above_pixels
        )

    def _renoise_animatediff(
        self,
        upsampled: torch.Tensor,
        size: StageSize,
        request: GenerationRequest,
        call: dict[str, Any],
    ) -> Any:
        vid2vid = self._renoise
        device = vid2vid._execution_device
        vid2vid.scheduler.set_timesteps(request.steps, device=device)
        timesteps, _ = vid2vid.get_timesteps(
            request.steps, vid2vid.scheduler.timesteps, request.pivot_strength, device
        )
        latents = upsampled.to(device=device, dtype=vid2vid.dtype)  # (B, C, F, H, W)
        noise = randn_tensor(
            latents.shape, generator=call["generator"], device=device, dtype=latents.dtype
        )
        noised = vid2vid.scheduler.add_noise(latents, noise, timesteps[:1])
        return vid2vid(
            latents=noised,
            height=size.height,
            width=size.width,
            strength=request.pivot_strength,
            num_inference_steps=request.steps,
            **call,
        ).frames

    # -- conditioning ------------------------------------------------------------------------

    def _encode_prompt(self, request: GenerationRequest) -> dict[str, torch.Tensor | None]:
        pipe = self.pipe
        cfg = request.guidance_scale > 1
        pe, npe = pipe.encode_prompt(
            request.prompt,
            pipe.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=request.negative_prompt,
        )
        return {"prompt_embeds": pe, "negative_prompt_embeds": npe}

    def _progress_kwargs(self, reporter: StepReporter) -> dict[str, Any]:
        """AnimateDiff calls `callback_on_step_end`; the older text-to-video pipelines only have
        the per-step `callback(step, timestep, latents)`, adapted here to the same reporter."""
        if self.is_animatediff:
            return {"callback_on_step_end": reporter}

        def callback(step: int, timestep: Any, _latents: torch.Tensor) -> None:
            reporter(self._first, step, timestep, {})

        return {"callback": callback, "callback_steps": 1}


def upsample_video_latents(
    latents: torch.Tensor, size: StageSize, vae_factor: int, mode: str = "bilinear"
) -> torch.Tensor:
    """Resize a clean video latent (B, C, F, h, w) frame by frame to the latent grid of `size`."""
    b, c, f, h, w = latents.shape
    per_frame = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # (B*F, C, h, w)
    resized = upsample_latents(per_frame, size, vae_factor, mode)  # (B*F, C, H, W)
    height, width = resized.shape[-2:]
    return resized.reshape(b, f, c, height, width).permute(0, 2, 1, 3, 4)  # (B, C, F, H, W)
