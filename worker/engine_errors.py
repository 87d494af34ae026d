"""Accelerator failures, recognised in one place (the only torch import of the job path)."""

from __future__ import annotations

import gc
import logging
import traceback

import torch

log = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    # Some kernels surface OOM as a plain RuntimeError with this text; the CPU allocator (make
    # run serves on the CPU) with "DefaultCPUAllocator: can't allocate memory".
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def is_fatal_accelerator_error(exc: BaseException) -> bool:
    """CUDA errors that poison the process's context (illegal address, device-side assert,
    ECC): every later kernel fails too, so only a fresh process recovers."""
    if is_out_of_memory(exc):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA error" in text or "device-side assert" in text)


def free_accelerator_memory(failure: BaseException | None = None) -> None:
    """Drop what the failed job held so the next job starts from the resident models only.

    The failure's traceback keeps every frame it passed through alive, and with them the job's
    tensors: their locals are cleared first, or the cache would have nothing to give back."""
    if failure is not None:
        traceback.clear_frames(failure.__traceback__)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        allocated_mib = torch.cuda.memory_allocated() / 2**20
        log.info("freed CUDA cache: %.0f MiB still allocated", allocated_mib)
