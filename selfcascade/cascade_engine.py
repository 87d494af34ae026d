"""What every self-cascade engine shares: the stage loop, the stage plan, steps per stage,
request validation, the stage views of the resident pipeline and the result's timing fields.
The image engine (`selfcascade.pipeline`) and the video engine (`selfcascade.video_pipeline`)
differ only in how a stage calls diffusers and what they return.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from selfcascade.compiled_unet import CompiledUNet
from selfcascade.cuda_graphs import UNetGraphs
from selfcascade.errors import InvalidRequest, ModelLoadError
from selfcascade.plan import StageSize, plan_stages
from selfcascade.progress import CancelToken, ProgressCallback
from selfcascade.request import GenerationRequest
from selfcascade.stage_hooks import StageHook, StageRun
from selfcascade.stage_runtime import (
    StepReporter,
    count_calls,
    make_scheduler,
    module_dtype_restored,
    synchronize_device,
)

log = logging.getLogger(__name__)

# diffusers' SD-family pipelines insist on multiples of 8 px whatever the VAE factor.
PIPELINE_SIZE_MULTIPLE = 8


@dataclass(frozen=True)
class StagesRun:
    """What the stage loop hands an engine: the last stage's decoded output and the timings."""

    output: Any  # what the last stage's diffusers pipeline returned (images or frames)
    timing: dict[str, Any]  # the StagedResult fields


@dataclass(frozen=True, kw_only=True)
class StagedResult:
    """What a cascade run reports besides its pixels."""

    seed: int
    stages: list[StageSize]
    stage_seconds: list[float]
    unet_evaluations: int
    stage_steps: list[int] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return sum(self.stage_seconds)


class CascadeEngine:
    """The stage loop, planning and validation shared by the image and video engines.

    `_run_stages` runs stage 1 as stock text-to-X and every later stage as upsample pivot ->
    stage hooks -> re-noise and denoise; a subclass says how each step calls diffusers
    (`_job_kwargs`, `_stage_kwargs`, `_run_first`, `_upsample`, `_run_renoise`,
    `_decode_context`) and wraps the output in its result type in `generate`.
    """

    produces_video: bool = False
    # The resident diffusers pipeline (set by the subclass); its modules expose dynamic
    # attributes mypy cannot see.
    pipe: Any

    @property
    def max_num_frames(self) -> int | None:
        """Most frames a clip may have on this model; None: no limit of the model's own."""
        return None

    def __init__(
        self,
        pipe: Any,
        *,
        renoise_cls: Any,
        tiled_decode_above_pixels: int | None,
        cuda_graph_max_pixels: int | None,
        compile_backend: str | None = None,
    ) -> None:
        """`pipe` is the resident pipeline (stage 1 runs it as it is); `renoise_cls` the stock
        diffusers pipeline class whose view runs the re-noise stages; stages up to
        `cuda_graph_max_pixels` replay CUDA graphs of the UNet (None: never); with a
        `compile_backend` ("inductor"), UNet calls of the signatures the warm-up compiled (shape,
        and the graph keys of the hooks present, so tuned per-step stages too) run
        `torch.compile`d (selfcascade/compiled_unet.py)."""
        if pipe.vae.config.latent_channels != 4:
            # diffusers' re-noise pipelines recognise an already-encoded latent by 4 channels.
            raise ModelLoadError("self-cascade needs a VAE with 4 latent channels")
        self.pipe = pipe
        # Compared with the pixels one VAE decode call handles (every frame of a video chunk).
        self.tiled_decode_above_pixels = tiled_decode_above_pixels
        compiled = CompiledUNet(pipe.unet, backend=compile_backend) if compile_backend else None
        self.unet_graphs = UNetGraphs(
            pipe.unet, max_pixels=cuda_graph_max_pixels, compiled=compiled
        )
        vae_factor = self.vae_factor = int(pipe.vae_scale_factor)
        down_levels = len(pipe.unet.config.down_block_types) - 1
        self.size_multiple = math.lcm(vae_factor, PIPELINE_SIZE_MULTIPLE)
        # Intermediate stages are rounded to what the UNet downsamples without padding.
        self.stage_multiple = math.lcm(vae_factor * 2**down_levels, PIPELINE_SIZE_MULTIPLE)
        native = int(pipe.unet.config.sample_size) * vae_factor
        self.native_size = StageSize(native, native)
        self._scheduler_config = pipe.scheduler.config
        # Steps beyond this index past the model's last training timestep (DDIM's leading
        # spacing adds `steps_offset`: 1000 steps of T = 1000 would ask for t = 1000).
        self.max_steps = int(self._scheduler_config.get("num_train_timesteps", 1000)) - int(
            self._scheduler_config.get("steps_offset", 0)
        )
        # Views of the one resident pipeline, built once; each job swaps in its own scheduler.
        self._first = self._stage_pipeline(type(pipe))
        self._renoise = self._stage_pipeline(renoise_cls)

    def plan(self, request: GenerationRequest) -> list[StageSize]:
        if request.method == "direct":
            return [StageSize(request.width, request.height)]
        return plan_stages(
            request.width,
            request.height,
            self.native_size.width,
            self.native_size.height,
            self.stage_multiple,
        )

    def stage_steps(self, request: GenerationRequest, stages: int) -> list[int]:
        """Denoising steps per stage, as diffusers' img2img computes them from the strength."""
        renoise = min(int(request.steps * request.pivot_strength), request.steps)
        return [request.steps] + [renoise] * (stages - 1)

    def validate(self, request: GenerationRequest) -> list[StageSize]:
        request.validate(self.size_multiple)
        if request.steps > self.max_steps:
            raise InvalidRequest(
                "steps", f"must be at most {self.max_steps} for this model's scheduler, "
                f"got {request.steps}",
            )
        self._check_kind(request)
        sizes = self.plan(request)
        if len(sizes) > 1 and self.stage_steps(request, 2)[1] < 1:
            raise InvalidRequest(
                "pivot_strength",
                f"steps x pivot_strength must be at least 1 for a re-noise stage "
                f"(got {request.steps} x {request.pivot_strength})",
            )
        return sizes

    def _check_kind(self, request: GenerationRequest) -> None:
        """Image engines refuse a frame count: a request for a video sent to an image model."""
        if not self.produces_video and request.num_frames is not None:
            raise InvalidRequest("num_frames", "this model makes images, not videos")

    def _run_stages(
        self,
        request: GenerationRequest,
        on_progress: ProgressCallback | None,
        cancel: CancelToken | None,
        stage_hooks: Sequence[StageHook],
    ) -> StagesRun:
        sizes = self.validate(request)
        steps = self.stage_steps(request, len(sizes))
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        # Schedulers are stateful: each job gets its own, shared by its stages.
        scheduler = make_scheduler(request.scheduler, self._scheduler_config)
        self._first.scheduler = self._renoise.scheduler = scheduler
        reporter = StepReporter(steps, on_progress, cancel, sizes)
        seconds: list[float] = []
        with (
            torch.inference_mode(),
            count_calls(self.pipe.unet) as unet_calls,
            module_dtype_restored(self.pipe.vae),
        ):
            # Prompt embeddings and the rest every stage passes, computed once per job.
            job_kwargs = self._job_kwargs(request, generator, reporter)
            pivot: torch.Tensor | None = None
            for index, size in enumerate(sizes, start=1):
                last = index == len(sizes)
                reporter.begin_stage(index)
                started = time.perf_counter()
                kwargs = {
                    **job_kwargs,
                    "output_type": "pil" if last else "latent",
                    **self._stage_kwargs(size),
                }
                with self._decode_context(request, size) if last else nullcontext():
                    if pivot is None:
                        with self.unet_graphs.stage(size.pixels):
                            output = self._run_first(request, size, kwargs)
                    else:
                        upsampled = self._upsample(pivot, size, request.upsample_mode)
                        # Graphs are decided after the hooks are in: hooks inside the UNet
                        # keep a stage eager.
                        with (
                            self._stage_hooks_entered(
                                request, index, sizes, pivot, upsampled, stage_hooks
                            ),
                            self.unet_graphs.stage(size.pixels),
                        ):
                            output = self._run_renoise(request, size, upsampled, kwargs)
                synchronize_device(self.pipe.device)
                seconds.append(time.perf_counter() - started)
                log.debug("stage %d/%d %s took %.3fs", index, len(sizes), size, seconds[-1])
                pivot = output
        timing = {
            "seed": request.seed,
            "stages": sizes,
            "stage_seconds": seconds,
            "unet_evaluations": unet_calls[0],
            "stage_steps": steps,
        }
        return StagesRun(output, timing)

    # -- what a subclass says about its diffusers pipelines ----------------------------------

    def _job_kwargs(
        self, request: GenerationRequest, generator: torch.Generator, reporter: StepReporter
    ) -> dict[str, Any]:
        """Keyword arguments every stage's diffusers call takes (prompt embeddings, guidance,
        generator, the progress callback)."""
        raise NotImplementedError

    def _stage_kwargs(self, size: StageSize) -> dict[str, Any]:
        """Per-stage extras (SDXL's size conditioning); none by default."""
        return {}

    def _run_first(
        self, request: GenerationRequest, size: StageSize, kwargs: dict[str, Any]
    ) -> Any:
        raise NotImplementedError

    def _upsample(self, pivot: torch.Tensor, size: StageSize, mode: str) -> torch.Tensor:
        raise NotImplementedError

    def _run_renoise(
        self,
        request: GenerationRequest,
        size: StageSize,
        upsampled: torch.Tensor,
        kwargs: dict[str, Any],
    ) -> Any:
        raise NotImplementedError

    def _decode_context(
        self, request: GenerationRequest, size: StageSize
    ) -> AbstractContextManager[None]:
        """Around the last stage, which decodes: tiled VAE decoding above a size."""
        return nullcontext()

    # -- shared pieces -----------------------------------------------------------------------

    def _stage_pipeline(self, cls: Any) -> Any:
        """A view of the resident pipeline: the same modules, never copied or re-cast."""
        # from_pipe casts to float32 unless told the dtype: that would upcast a shared fp16 UNet.
        stage_pipe = cls.from_pipe(self.pipe, dtype=self.pipe.dtype)
        stage_pipe.set_progress_bar_config(**getattr(self.pipe, "_progress_bar_config", {}))
        return stage_pipe

    @contextmanager
    def _stage_hooks_entered(
        self,
        request: GenerationRequest,
        index: int,
        sizes: list[StageSize],
        pivot: torch.Tensor,
        upsampled: torch.Tensor,
        stage_hooks: Sequence[StageHook],
    ) -> Iterator[None]:
        """Every stage hook active around re-noise stage `index` (1-based), exited in reverse."""
        run = StageRun(
            index=index,
            stages=len(sizes),
            size=sizes[index - 1],
            previous_size=sizes[index - 2],
            unet=self.pipe.unet,
            pivot_latents=pivot,
            upsampled_latents=upsampled,
            pivot_strength=request.pivot_strength,
            lr_features=request.lr_features,
        )
        with ExitStack() as hooks:
            for hook in stage_hooks:
                hooks.enter_context(hook(run))
            yield

    def generate(
        self,
        request: GenerationRequest,
        *,
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        stage_hooks: Sequence[StageHook] = (),
    ) -> StagedResult:
        raise NotImplementedError
