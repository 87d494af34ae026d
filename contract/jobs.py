"""The generation job as it crosses Redis: pydantic models serialised as JSON, never pickle."""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import BaseModel, Field

# The encoders' bounds, which the command line checks too.
from selfcascade.output_formats import MAX_FPS

# The engine's bounds and choices, which the API enforces for every model (a model's spec may
# name its own default K / T, and fewer frames).
from selfcascade.request import (
    MAX_FRAMES,
    MAX_SEED,
    PAPER_PIVOT_STRENGTH,
    LRFeatureMode,
    Method,
    SchedulerName,
    UpsampleMode,
)

MAX_PROMPT_CHARS = 2000
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
# The caller's own key-value pairs on a job (an order id, a user id), echoed in every view and
# webhook: OpenAI's limits, so a client written for theirs fits here.
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512

ImageFormat = Literal["png", "webp", "jpeg"]
VideoFormat = Literal["mp4", "webm", "gif"]
OutputFormat = Literal[ImageFormat, VideoFormat]
IMAGE_FORMATS: tuple[ImageFormat, ...] = ("png", "webp", "jpeg")
VIDEO_FORMATS: tuple[VideoFormat, ...] = ("mp4", "webm", "gif")
# image: a generated picture; video: a clip; poster: a still of a clip (its first frame).
OutputRole = Literal["image", "video", "poster"]


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class ErrorCode(enum.StrEnum):
    """Machine-readable error codes, shared by HTTP errors and failed jobs."""

    INVALID_REQUEST = "invalid_request"
    BODY_TOO_LARGE = "body_too_large"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CONFLICT = "conflict"
    QUEUE_FULL = "queue_full"
    REDIS_UNAVAILABLE = "redis_unavailable"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    OUT_OF_MEMORY = "out_of_memory"
    TIMEOUT = "timeout"
    WORKER_LOST = "worker_lost"
    MODEL_UNAVAILABLE = "model_unavailable"
    INTERNAL = "internal_error"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_ACTIVE_JOBS = "too_many_active_jobs"
    SERVER_BUSY = "server_busy"  # this API process is at a limit of its own (event streams)


class GenerationParams(BaseModel):
    """Normalised parameters of one generation: what the API accepted and the worker runs.

    Field bounds are the API's rules; model-dependent checks (size multiple, pixel budget,
    model name) need settings and live in the service's validator.
    """

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    model: str
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    seed: int = Field(ge=0, le=MAX_SEED)
    steps: int = Field(default=50, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(default=7.5, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)
    method: Method = "self_cascade"
    tuned: bool | Literal["auto"] = "auto"
    pivot_strength: float = Field(default=PAPER_PIVOT_STRENGTH, gt=0, le=1, allow_inf_nan=False)
    scheduler: SchedulerName = "ddim"
    upsample_mode: UpsampleMode = "bilinear"
    # Tuned mode: the pivot's features recomputed every step (official) or once per stage
    # (bench/GPU_NOTES.md: 1.085x -> 1.033x of tuning-free at SD2.1 2048^2); ignored otherwise.
    lr_features: LRFeatureMode = "per_step"
    output_format: OutputFormat = "png"
    # Set for video models only (the validator fills in the model's defaults), None for images.
    num_frames: int | None = Field(default=None, ge=1, le=MAX_FRAMES)
    fps: int | None = Field(default=None, ge=1, le=MAX_FPS)

    @property
    def is_video(self) -> bool:
        return self.num_frames is not None


class ProgressRecord(BaseModel):
    stage: int
    stages: int
    step: int
    steps: int
    fraction: float
    # The size this stage samples at; absent in records written before it was reported.
    width: int | None = None
    height: int | None = None


class OutputRecord(BaseModel):
    """One stored result file. `key` is the storage object key (derived from the job id only).

    A video job stores the clip (role "video", with its frame count and rate) and a poster.
    """

    index: int
    key: str
    width: int
    height: int
    format: OutputFormat
    bytes: int
    sha256: str
    role: OutputRole = "image"
    frames: int | None = None
    fps: int | None = None


class ErrorInfo(BaseModel):
    code: ErrorCode
    message: str


class JobMetrics(BaseModel):
    queue_s: float | None = None
    inference_s: float | None = None
    stage_seconds: list[float] = Field(default_factory=list)
    # [width, height] of each stage, in the order stage_seconds lists them.
    stage_sizes: list[tuple[int, int]] = Field(default_factory=list)
    unet_evaluations: int | None = None
    tuned: bool | None = None


Priority = Literal["interactive", "batch"]
WebhookEvent = Literal["start", "progress", "completed"]


def _completed_only() -> list[WebhookEvent]:
    return ["completed"]


class JobOrigin(BaseModel):
    """Who asked for a generation and where to report it: set by the API, read by everyone.

    `owner` is the API key's id (None in open mode); another key never sees the job.
    """

    owner: str | None = None
    user: str | None = None  # the caller's own end-user id (OpenAI's `user`), for their logs
    priority: Priority = "interactive"
    request_id: str | None = None
    traceparent: str | None = None
    webhook: str | None = None
    # The machine `webhook` resolved to when the job was accepted (WebhookTarget.receiver):
    # the key of the per-receiver send limit. None: the URL's host:port is used instead.
    webhook_receiver: str | None = None
    webhook_events_filter: list[WebhookEvent] = Field(default_factory=_completed_only)
    metadata: dict[str, str] = Field(default_factory=dict)  # the caller's, as given


class JobRecord(BaseModel):
    """Everything stored about a generation (the Redis hash, decoded)."""

    id: str
    status: JobStatus
    params: GenerationParams
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    worker: str | None = None
    progress: ProgressRecord | None = None
    outputs: list[OutputRecord] = Field(default_factory=list)
    error: ErrorInfo | None = None
    metrics: JobMetrics = Field(default_factory=JobMetrics)
    origin: JobOrigin = Field(default_factory=JobOrigin)


EventType = Literal["queued", "started", "progress", "succeeded", "failed", "canceled", "requeued"]


class JobEvent(BaseModel):
    """One entry of a job's event stream; SSE sends these as they are."""

    type: EventType
    status: JobStatus
    at: float
    progress: ProgressRecord | None = None
    error: ErrorInfo | None = None
    data: dict[str, Any] = Field(default_factory=dict)
