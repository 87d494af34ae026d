"""Checks that need the configuration: model names, size multiples, the pixel budget, and which
parameters a model's modality (image or video) takes."""

from __future__ import annotations

import secrets

from contract.jobs import (
    IMAGE_FORMATS,
    MAX_SEED,
    VIDEO_FORMATS,
    ErrorCode,
    GenerationParams,
    OutputFormat,
)
from contract.settings import ModelSpec, Settings
from selfcascade.output_formats import GIF_MAX_FPS, size_problem
from selfcascade.request import pixel_budget_problem
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

    if "webhook_events_filter" in body.model_fields_set and body.webhook is None:
        # Silently dropped before: almost surely a webhook the caller meant to send and forgot.
        raise _invalid(
            "webhook_events_filter", "selects the events sent to a webhook; add webhook"
        )
    if body.tuned is True and body.method == "direct":
        raise _invalid("tuned", "tuned upsamplers work inside self-cascade stages; use method "
                       "self_cascade or tuned false")
    if body.tuned is True and not spec.upsamplers:
        raise _invalid("tuned", f"model {name} has no tuned upsamplers; use false or auto")
    output_format, num_frames, fps = _media_fields(body, spec, models)

    width = body.width or spec.native_width
    height = body.height or spec.native_height
    for param, value in (("width", width), ("height", height)):
        if value % spec.size_multiple:
            raise _invalid(
                param,
                f"must be a multiple of {spec.size_multiple} px for model {name}, got {value}",
            )
    over = pixel_budget_problem(width, height, settings.max_pixels)
    if over:
        raise _invalid(*over)
    if num_frames and width * height * num_frames > settings.max_video_pixels:
        frames = f"{num_frames} frames" if body.num_frames else f"the model's {num_frames} frames"
        raise _invalid(
            "num_frames",
            f"{frames} of {width}x{height} exceed the video budget of "
            f"{settings.max_video_pixels} pixels (frames x width x height); fewer frames or a "
            "smaller size fit",
        )
    cascades = body.method == "self_cascade" and width * height > (
        spec.native_width * spec.native_height
    )
    pivot_strength = body.pivot_strength or spec.default_pivot_strength
    # A re-noise stage denoises int(steps * pivot_strength) steps; zero would be no stage at all.
    if cascades and int(body.steps * pivot_strength) < 1:
        raise _invalid(
            "pivot_strength",
            f"steps x pivot_strength must be at least 1 for a re-noise stage "
            f"(got {body.steps} x {pivot_strength})",
        )
    # What the encoder itself would refuse, refused before the job spends a whole cascade.
    problem = size_problem(output_format, width, height)
    if problem:
        raise _invalid(*problem)
    seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
    fields = body.model_dump(
        exclude={
            "model", "width", "height", "seed", "pivot_strength", "output_format", "num_frames",
            "fps",
        }
    )
    return GenerationParams(
        model=name,
        width=width,
        height=height,
        seed=seed,
        pivot_strength=pivot_strength,
        output_format=output_format,
        num_frames=num_frames,
        fps=fps,
        **fields,
    )


def _media_fields(
    body: GenerationCreate, spec: ModelSpec, models: list[ModelSpec]
) -> tuple[OutputFormat, int | None, int | None]:
    """output_format, num_frames and fps for the model's modality, defaults filled in."""
    if not spec.produces_video:
        for param in ("num_frames", "fps"):
            if getattr(body, param) is not None:
                video = [m.name for m in models if m.produces_video]
                hint = f"; video models: {', '.join(video)}" if video else ""
                raise _invalid(
                    param, f"model {spec.name} produces images; {param} is for video models{hint}"
                )
        return _format(body.output_format, spec, IMAGE_FORMATS), None, None
    num_frames = body.num_frames or spec.default_num_frames
    if num_frames > spec.max_num_frames:
        raise _invalid(
            "num_frames",
            f"model {spec.name} makes at most {spec.max_num_frames} frames, got {num_frames}",
        )
    fps = body.fps or spec.default_fps
    output_format = _format(body.output_format, spec, VIDEO_FORMATS)
    if output_format == "gif" and fps > GIF_MAX_FPS:
        raise _invalid(
            "fps",
            f"gif plays at most {GIF_MAX_FPS} fps (its frame delays are hundredths of a second, "
            f"and browsers slow shorter ones down to 100 ms); got {fps}: use mp4 or webm",
        )
    return output_format, num_frames, fps


def _format(
    requested: OutputFormat | None, spec: ModelSpec, allowed: tuple[OutputFormat, ...]
) -> OutputFormat:
    if requested is None:
        return allowed[0]
    if requested not in allowed:
        kind = "video" if spec.produces_video else "images"
        raise _invalid(
            "output_format",
            f"model {spec.name} produces {kind}: use {', '.join(allowed)}, not {requested}",
        )
    return requested


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(422, ErrorCode.INVALID_REQUEST, f"{param}: {message}", param)
