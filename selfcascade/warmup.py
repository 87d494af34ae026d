"""Warm-up at load: one short job so a worker's first real job runs at warm speed.

The first generation in a process pays once for what every later one reuses: cuBLAS/cuDNN
handles and kernel selection, the caching allocator's first blocks, lazy imports inside
diffusers. A two-stage job at twice the native size touches every path a real job takes
(text encoder, txt2img, upsample + img2img re-noise, VAE decode) for a few UNet evaluations.

An engine that compiles its UNet (selfcascade/compiled_unet.py) compiles during the warm-up,
and only then: every stage of a square job `scale` times the native size per side, with the
`stage_hooks` given (a tuned warm-up compiles the tuned stages).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

from selfcascade.request import GenerationRequest

log = logging.getLogger(__name__)

WARM_UP_PROMPT = "warm-up"


def warm_up(
    engine: Any, *, steps: int = 2, scale: int = 2, stage_hooks: Sequence[Any] = ()
) -> float:
    """Run one short self-cascade job `scale` times the native size per side through `engine`
    (with `stage_hooks`); return its wall time in seconds."""
    native = engine.native_size
    request = GenerationRequest(
        prompt=WARM_UP_PROMPT,
        width=native.width * scale,
        height=native.height * scale,
        steps=steps,
        # At least one re-noise step whatever `steps` is: the img2img path must run too.
        pivot_strength=1.0,
        # A video engine warms up on a short clip: the kernels are the same, the cost is not.
        num_frames=2 if getattr(engine, "produces_video", False) else None,
    )
    compiled = engine.unet_graphs.compiled  # a CompiledUNet when the engine compiles
    started = time.perf_counter()
    with compiled.compiling() if compiled is not None else nullcontext():
        engine.generate(request, stage_hooks=stage_hooks)
    seconds = time.perf_counter() - started
    log.info("warm-up job (%dx%d, %d steps%s) took %.2fs", request.width, request.height, steps,
             ", with stage hooks" if stage_hooks else "", seconds)
    return seconds
