"""What running a cascade job needs around the diffusers calls, shared by every engine: a fresh
scheduler per job, per-step progress and cancellation, UNet call counting, tiled VAE decoding
above a size, and the VAE's dtype guard.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from selfcascade.errors import GenerationCancelled, InvalidRequest
from selfcascade.plan import StageSize
from selfcascade.progress import CancelToken, Progress, ProgressCallback

log = logging.getLogger(__name__)

# Above this many output pixels the VAE decodes in tiles: an SD VAE decode at 4096^2 needs
# ~38 GiB in one piece and ~1 GiB tiled (bench/GPU_NOTES.md); at 2048^2 one piece still fits.
DEFAULT_TILED_DECODE_ABOVE_PIXELS = 2048 * 2048


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
