"""Public request and response bodies. Stored shapes live in contract.jobs; these are the views."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
)

from contract.jobs import (
    MAX_FPS,
    MAX_FRAMES,
    MAX_GUIDANCE,
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE_CHARS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    ErrorInfo,
    GenerationParams,
    JobMetrics,
    JobStatus,
    LRFeatureMode,
    Method,
    OutputFormat,
    OutputRole,
    Priority,
    ProgressRecord,
    SchedulerName,
    UpsampleMode,
    WebhookEvent,
)


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be blank")
    return text


# What a caller types: a blank prompt conditions on nothing, so it is refused rather than run.
Prompt = Annotated[
    str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_not_blank)
]


def _json_number(kind: str) -> BeforeValidator:
    """Only a JSON number: pydantic's lax mode would also parse a string ("128", "7.5") and
    take a boolean as 1 or 0, each a client bug that should not run as a number."""

    def check(value: object) -> object:
        if isinstance(value, bool):  # first: a bool is an int to Python
            raise ValueError(f"must be {kind}, not true or false")
        if isinstance(value, str):
            raise ValueError(f"must be {kind}, not a string")
        return value

    return BeforeValidator(check)


# Counts (sizes, seed, steps, frames, fps; the OpenAI route's n) are integers, 768.0 too: a
# client computing a size in floating point, as JavaScript does, sends one (768.5 is refused).
Count = Annotated[int, _json_number("an integer")]
# Real numbers (guidance_scale, pivot_strength): any JSON number, an integer too, but never a
# string or a boolean (`true` would be 1.0, itself a valid pivot_strength).
Real = Annotated[float, _json_number("a number")]


def _tuned_choice(value: object) -> object:
    # Strictly the three documented values: pydantic alone would take "yes", "off" or 1 as a
    # boolean, and answer "AUTO" with an error about its own union members.
    if value is True or value is False or value == "auto":
        return value
    raise ValueError('must be true, false or "auto"')


Tuned = Annotated[bool | Literal["auto"], BeforeValidator(_tuned_choice)]

MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_METADATA_KEY_CHARS)]
MetadataValue = Annotated[str, StringConstraints(max_length=MAX_METADATA_VALUE_CHARS)]


class GenerationCreate(BaseModel):
    """POST /v1/generations. Unknown fields are refused so a typo never silently defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(default=None, min_length=1)  # default: the first configured one
    width: Count | None = Field(default=None, gt=0)  # default: the model's native size
    height: Count | None = Field(default=None, gt=0)
    seed: Count | None = Field(default=None, ge=0, le=MAX_SEED)  # random when absent, echoed
    steps: Count = Field(default=50, ge=1, le=MAX_STEPS)
    guidance_scale: Real = Field(default=7.5, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)
    method: Method = "self_cascade"
    tuned: Tuned = "auto"
    # default: the model's (GET /v1/models: default_pivot_strength; the paper's 0.7 for SD)
    pivot_strength: Real | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    scheduler: SchedulerName = "ddim"
    upsample_mode: UpsampleMode = "bilinear"
    # Tuned mode: the pivot's features recomputed every step (official) or once per stage
    # (bench/GPU_NOTES.md: 1.085x -> 1.033x of tuning-free at SD2.1 2048^2); ignored otherwise.
    lr_features: LRFeatureMode = "per_step"
    # default: png for an image model, mp4 for a video model
    output_format: OutputFormat | None = None
    # Video models only (default: the model's own); an image model refuses them.
    num_frames: Count | None = Field(default=None, ge=1, le=MAX_FRAMES)
    fps: Count | None = Field(default=None, ge=1, le=MAX_FPS)
    # Not engine parameters: how the job is scheduled and reported (contract.jobs.JobOrigin).
    priority: Priority = "interactive"
    webhook: str | None = Field(default=None, max_length=2000)
    webhook_events_filter: list[WebhookEvent] = Field(
        default_factory=lambda: list[WebhookEvent](["completed"]), max_length=3
    )
    # The caller's own strings (an order id, a user id), echoed in every view and webhook;
    # strict: a number is refused, not turned into a string that no longer compares equal.
    metadata: dict[MetadataKey, MetadataValue] | None = Field(
        default=None, max_length=MAX_METADATA_PAIRS, strict=True
    )


class OutputView(BaseModel):
    url: str
    width: int
    height: int
    format: OutputFormat
    bytes: int
    sha256: str
    role: OutputRole = "image"
    frames: int | None = None  # video only, as are fps and duration_s
    fps: int | None = None
    duration_s: float | None = None


class GenerationView(BaseModel):
    id: str
    status: JobStatus
    model: str
    params: GenerationParams
    progress: ProgressRecord | None
    # Jobs a worker takes before this one: those ahead in its model's queue, plus (for batch)
    # the model's interactive jobs. None once it left the queue.
    queue_position: int | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    outputs: list[OutputView]
    error: ErrorInfo | None
    metrics: JobMetrics
    priority: Priority = "interactive"
    webhook: str | None = None
    webhook_events_filter: list[WebhookEvent] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)


class ModelView(BaseModel):
    name: str
    native_width: int
    native_height: int
    size_multiple: int
    tuned_available: bool
    default_pivot_strength: float
    loaded_by_workers: int
    produces: Literal["image", "video"]
    output_formats: list[OutputFormat]
    # Video models only: what num_frames and fps default to, and the most frames a job may ask.
    default_num_frames: int | None = None
    max_num_frames: int | None = None
    default_fps: int | None = None
