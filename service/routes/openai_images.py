"""`POST /v1/images/generations`, shaped like OpenAI's Images API so its clients work unchanged.

`n` images are run as n ordinary generations (seeds seed, seed+1, ...): each is visible through
GET /v1/generations/{id}, and several workers can share them. The request waits for all of
them (up to `openai_wait_s`) and answers like OpenAI; on timeout the jobs are canceled and the
answer is 504 in OpenAI's error shape. The wait holds one of the app's wait slots: with all of
them taken the request is refused before any job is made (429 with Retry-After). Fields OpenAI
has but this engine cannot honour (quality, style, background...) are accepted and ignored, as
OpenAI's own smaller models do. The body of POST /v1/generations is taken too (OpenAI's client
sends it as `extra_body`), with the same meaning and checks, but for what OpenAI's shape has its
own way (`size`, `output_format`) and the video-only fields (this route refuses video models).
"""

from __future__ import annotations

import base64
import copy
import re
import time
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from contract.jobs import (
    MAX_SEED,
    ErrorCode,
    GenerationParams,
    ImageFormat,
    JobRecord,
    JobStatus,
)
from service.auth import Caller
from service.cancellation import cancel
from service.deps import Services
from service.errors import ApiError
from service.routes.generations import (
    origin_of,
    redis_retried,
    wait_for_terminal,
    wait_slot,
)
from service.schemas import Count, GenerationCreate
from service.services import ApiServices
from service.submission import submit
from service.validation import normalise
from service.views import client_base_url, output_url

router = APIRouter(prefix="/v1/images", tags=["openai"])

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
MAX_IMAGES = 4


class OpenAIImageFields(BaseModel):
    """OpenAI's own fields of an image request. Unknown fields are refused, as OpenAI does: a
    typo in `extra_body` (`stepz`) must not silently run the defaults."""

    model_config = ConfigDict(extra="forbid")

    n: Count = Field(default=1, ge=1, le=MAX_IMAGES)
    size: str | None = None  # "WxH"; "auto" or absent: the model's native size
    response_format: Literal["url", "b64_json"] = "url"
    output_format: ImageFormat = "png"
    user: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)  # OpenAI's newer `user`
    stream: bool = False
    # OpenAI's, accepted so its clients' requests are, with no effect on a diffusion model.
    quality: str | None = Field(default=None, max_length=32)
    style: str | None = Field(default=None, max_length=32)
    background: str | None = Field(default=None, max_length=32)
    moderation: str | None = Field(default=None, max_length=32)
    complexity: str | None = Field(default=None, max_length=32)
    output_compression: Count | None = Field(default=None, ge=0, le=100)
    partial_images: Count | None = Field(default=None, ge=0, le=3)


# The native body's fields that OpenAI's shape has its own way (size for width and height, its
# images-only output_format) or that only a video model takes, which this route refuses.
_NOT_FROM_NATIVE = frozenset({"width", "height", "output_format", "num_frames", "fps"})
# Every other field of POST /v1/generations (prompt, model, and this service's own, which
# OpenAI's client sends as `extra_body`, i.e. top-level JSON fields), taken from GenerationCreate
# itself: the same types, bounds, defaults and validators, and a field added there is taken here.
NATIVE_FIELDS = tuple(f for f in GenerationCreate.model_fields if f not in _NOT_FROM_NATIVE)

if TYPE_CHECKING:  # what a type checker can know of a model built at import time
    OpenAIImageRequest = OpenAIImageFields
else:
    OpenAIImageRequest = create_model(
        "OpenAIImageRequest",
        __base__=OpenAIImageFields,
        __module__=__name__,
        __doc__="OpenAI's image request, plus POST /v1/generations' fields that fit it.",
        **{
            name: (field.annotation, copy.copy(field))
            for name, field in GenerationCreate.model_fields.items()
            if name in NATIVE_FIELDS
        },
    )


class OpenAIImage(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    output_format: ImageFormat
    size: str


@router.post("/generations", response_model=OpenAIImagesResponse, response_model_exclude_none=True)
async def create_images(
    body: OpenAIImageRequest, services: Services, caller: Caller, request: Request
) -> OpenAIImagesResponse:
    # Async: the wait holds a wait slot and the asyncio Redis client, never a worker thread.
    caller.require("generate")
    if body.response_format == "url" and not services.storage.presigns:
        # Links to this API need `read`: refused before any job exists, not at the download.
        caller.require("read", "response_format url hands back download links; b64_json does not")
    native, params = _generation_params(body, services)
    # As the native route's, its webhook refused before any job exists (DNS: off the event loop).
    user = body.user or body.safety_identifier
    origin = await run_in_threadpool(origin_of, request, caller, native, user)
    async with wait_slot(request) as granted:
        if not granted:
            raise ApiError(
                429, ErrorCode.QUEUE_FULL,
                "too many requests are already waiting for their images; retry shortly",
                None, {"Retry-After": "5"},
            )
        admission = request.app.state.admission
        records = await run_in_threadpool(submit, services, admission, caller, params, origin)
        ids = [r.id for r in records]
        finished = await _wait_all(services, ids, services.settings.openai_wait_s)
    failed = next((r for r in finished if r.status is not JobStatus.SUCCEEDED), None)
    if failed is not None:
        raise _job_error(failed)
    base_url = client_base_url(services.settings, request)
    data = [
        await run_in_threadpool(_image, services, r, body.response_format, base_url)
        for r in finished
    ]
    return OpenAIImagesResponse(
        created=int(records[0].created_at),
        data=data,
        output_format=body.output_format,
        size=f"{params[0].width}x{params[0].height}",
    )


def _generation_params(
    body: OpenAIImageFields, services: ApiServices
) -> tuple[GenerationCreate, list[GenerationParams]]:
    """The request as POST /v1/generations' body, and its n generations' parameters (seeds seed,
    seed+1, ...); 4xx before anything is queued."""
    if body.stream:
        raise ApiError(422, ErrorCode.INVALID_REQUEST, "stream: not supported", "stream")
    width, height = _parse_size(body.size)
    native = _native_body(body, width, height)
    _refuse_video_model(services, native.model)
    try:
        first = normalise(native, services.models, services.settings)
    except ApiError as exc:
        raise _as_size(exc) from None
    return native, [
        first.model_copy(update={"seed": (first.seed + i) % (MAX_SEED + 1)}) for i in range(body.n)
    ]


def _as_size(exc: ApiError) -> ApiError:
    """A width or height refused is, in this request, its `size` (there is no width field)."""
    if exc.param not in ("width", "height"):
        return exc
    message = exc.message.removeprefix(f"{exc.param}: ")
    return ApiError(exc.status, exc.code, f"size ({exc.param}): {message}", "size", exc.headers)


def _native_body(
    body: OpenAIImageFields, width: int | None, height: int | None
) -> GenerationCreate:
    """The native body: the fields it shares with this request as given, the size, and
    OpenAI's output_format."""
    given: dict[str, Any] = body.model_dump(include=set(NATIVE_FIELDS), exclude_unset=True)
    try:
        # Those fields were validated as GenerationCreate's already: this also runs its checks
        # of a body as a whole, should it ever have any.
        return GenerationCreate(
            **given, width=width, height=height, output_format=body.output_format
        )
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        ) from None


def _refuse_video_model(services: ApiServices, name: str | None) -> None:
    """An images API answers images: a video model is reached through POST /v1/generations."""
    spec = next((m for m in services.models if m.name == (name or services.models[0].name)), None)
    if spec is not None and spec.produces_video:
        raise ApiError(
            422, ErrorCode.INVALID_REQUEST,
            f"model: {spec.name} produces video; use POST /v1/generations", "model",
        )


def _parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    match = _SIZE.match(size)
    if not match:
        raise ApiError(422, ErrorCode.INVALID_REQUEST, "size: must be 'WIDTHxHEIGHT'", "size")
    width, height = int(match.group(1)), int(match.group(2))
    if not width or not height:
        raise ApiError(422, ErrorCode.INVALID_REQUEST, "size: must be positive", "size")
    return width, height


async def _wait_all(
    services: ApiServices, job_ids: list[str], timeout_s: float
) -> list[JobRecord]:
    """Every job's final record; cancels them all and answers 504 when time runs out."""
    deadline = time.monotonic() + timeout_s
    for job_id in job_ids:
        # Not ended by a drain: this route has no 202 to answer, and ending the wait would
        # cancel the jobs; it waits on until they end or the server's grace runs out.
        if not await wait_for_terminal(services, job_id, deadline, end_on_drain=False):
            # Through a Redis blip too: jobs left queued would run for a client that has gone
            # (and OpenAI's client retries an error into more of them).
            await redis_retried(lambda: _cancel_all(services, job_ids))
            raise ApiError(
                504, ErrorCode.TIMEOUT,
                f"the images were not ready within {timeout_s:g}s; the jobs were canceled",
            )
    return await redis_retried(lambda: _final_records(services, job_ids))


def _cancel_all(services: ApiServices, job_ids: list[str]) -> None:
    for pending in filter(None, map(services.store.get, job_ids)):
        cancel(services, pending)


def _final_records(services: ApiServices, job_ids: list[str]) -> list[JobRecord]:
    records: list[JobRecord] = []
    for job_id in job_ids:
        record = services.store.get(job_id)
        if record is None:
            raise ApiError(500, ErrorCode.INTERNAL, f"generation {job_id} vanished")
        records.append(record)
    return records


def _job_error(record: JobRecord) -> ApiError:
    error = record.error
    code = error.code if error else ErrorCode.INTERNAL
    message = error.message if error else f"generation {record.status.value}"
    status = 400 if code is ErrorCode.INVALID_REQUEST else 500
    return ApiError(status, code, f"generation {record.id}: {message}")


def _image(
    services: ApiServices, record: JobRecord, response_format: str, base_url: str
) -> OpenAIImage:
    output = record.outputs[0]
    if response_format == "b64_json":
        data = b"".join(services.storage.open(output.key))
        return OpenAIImage(b64_json=base64.b64encode(data).decode())
    url = services.storage.presigned_url(output.key, services.settings.presign_expiry_s)
    return OpenAIImage(url=url or output_url(base_url, record.id, output.index))
