"""Every error the engine raises on purpose. Flat, one line each: callers match on the type."""

from __future__ import annotations


class SelfCascadeError(Exception):
    """Base class: anything the engine raises deliberately."""


class InvalidRequest(SelfCascadeError, ValueError):
    """A generation parameter is out of range or not accepted by the model."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


class GenerationCancelled(SelfCascadeError):
    """The caller asked to stop; raised between two denoising steps."""

    def __init__(self, stage: int, step: int) -> None:
        super().__init__(f"generation cancelled at stage {stage}, step {step}")
        self.stage = stage
        self.step = step


class ModelLoadError(SelfCascadeError):
    """A model path or hub id could not be loaded as a supported diffusers pipeline."""


class CheckpointError(SelfCascadeError):
    """An upsampler checkpoint is corrupt, truncated, or made for another base model."""
