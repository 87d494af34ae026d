"""Checks that need the configuration: model names, size multiples, the pixel budget."""

from __future__ import annotations

import secrets

from contract.jobs import MAX_SEED, ErrorCode, GenerationParams
from contract.settings import ModelSpec, Settings
from service.errors import ApiError
from service.schemas import GenerationCreate


def normalise(
    body: GenerationCreate, models: list[ModelSpec], settings: Settings
) -> GenerationParams:
    """The accepted parameters with every default filled in; 422 naming the first bad one."""
    by_name = {m.name: m for m in models}
    name = body.model or models[0].name
    spec = by_name.get(name)
    if spec is None:
        raise _invalid("model", f"unknown model {name!r}; known: {', '.join(by_name)}")

    if body.tuned is True and body.method == "direct":
        raise _invalid("tuned", "tuned upsamplers work inside self-cascade stages; use method "
                       "self_cascade or tuned false")
    if body.tuned is True and spec.upsamplers is None:
        raise _invalid("tuned", f"model {name} has no tuned upsamplers; use false or auto")

    width = body.width or spec.native_width
    height = body.height or spec.native_height
    for param, value in (("width", width), ("height", height)):
        if value % spec.size_multiple:
            raise _invalid(
                param,
                f"must be a multiple of {spec.size_multiple} px for model {name}, got {value}",
            )
    if width * height > settings.max_pixels:
        raise _invalid(
            "width" if width >= height else "height",
            f"{width}x{height} exceeds the pixel budget of {settings.max_pixels} pixels",
        )
    cascades = body.method == "self_cascade" and width * height > (
        spec.native_width * spec.native_height
    )
    # A re-noise stage denoises int(steps * pivot_strength) steps; zero would be no stage at all.
    if cascades and int(body.steps * body.pivot_strength) < 1:
        raise _invalid(
            "pivot_strength",
            f"steps x pivot_strength must be at least 1 for a re-noise stage "
            f"(got {body.steps} x {body.pivot_strength})",
        )
    seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
    fields = body.model_dump(exclude={"model", "width", "height", "seed"})
    return GenerationParams(model=name, width=width, height=height, seed=seed, **fields)


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(422, ErrorCode.INVALID_REQUEST, f"{param}: {message}", param)
