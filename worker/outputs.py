"""Encode results (images, or a video and its poster) and write them to storage with metadata."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

from contract.jobs import GenerationParams, OutputFormat, OutputRecord, OutputRole
from contract.storage import ResultStorage, object_key
from contract.storage.base import CONTENT_TYPES
from selfcascade.video_encoding import encode_video

PIL_FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}
POSTER_FORMAT: OutputFormat = "png"


def store_images(
    storage: ResultStorage,
    job_id: str,
    images: list[Any],
    params: GenerationParams,
    stage_seconds: list[float],
) -> list[OutputRecord]:
    result = _Result(storage, job_id, params, stage_seconds)
    fmt = params.output_format
    return [
        result.put(index, fmt, _image_bytes(image, fmt), image.size)
        for index, image in enumerate(images)
    ]


def store_video(
    storage: ResultStorage,
    job_id: str,
    frames: list[Any],
    params: GenerationParams,
    stage_seconds: list[float],
) -> list[OutputRecord]:
    """Output 0 is the clip, output 1 its poster: the first frame, the picture a player shows
    before it starts, so the poster never jumps to another scene when playback begins."""
    if params.fps is None:
        raise ValueError("a video job needs fps (the API fills in the model's default)")
    result = _Result(storage, job_id, params, stage_seconds)
    video = encode_video(frames, params.output_format, params.fps)
    first = frames[0]
    return [
        result.put(
            0, params.output_format, video, first.size,
            role="video", frames=len(frames), fps=params.fps,
        ),
        result.put(1, POSTER_FORMAT, _image_bytes(first, POSTER_FORMAT), first.size, role="poster"),
    ]


def _image_bytes(image: Any, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=PIL_FORMATS[fmt])
    return buffer.getvalue()


class _Result:
    """One job's outputs: each file stored under its key with the job's metadata."""

    def __init__(
        self,
        storage: ResultStorage,
        job_id: str,
        params: GenerationParams,
        stage_seconds: list[float],
    ) -> None:
        self.storage = storage
        self.job_id = job_id
        self.params = params
        self.stage_seconds = stage_seconds

    def put(
        self,
        index: int,
        fmt: OutputFormat,
        data: bytes,
        size: tuple[int, int],
        role: OutputRole = "image",
        frames: int | None = None,
        fps: int | None = None,
    ) -> OutputRecord:
        digest = hashlib.sha256(data).hexdigest()
        key = object_key(self.job_id, index, fmt)
        metadata = {
            "job-id": self.job_id,
            "seed": str(self.params.seed),
            "sha256": digest,
            "role": role,
            "stage-seconds": json.dumps([round(s, 4) for s in self.stage_seconds]),
            # Object metadata must be short ASCII (S3 headers): the prompt is not repeated here.
            "params": self.params.model_dump_json(exclude={"prompt", "negative_prompt"}),
        }
        stored = self.storage.put(key, data, CONTENT_TYPES[fmt], metadata)
        return OutputRecord(
            index=index,
            key=key,
            width=size[0],
            height=size[1],
            format=fmt,
            bytes=stored.bytes,
            sha256=digest,
            role=role,
            frames=frames,
            fps=fps,
        )
