"""Encode result images and write them to storage with their metadata."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

from contract.jobs import GenerationParams, OutputRecord
from contract.storage import ResultStorage, object_key
from contract.storage.base import CONTENT_TYPES

PIL_FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}


def store_images(
    storage: ResultStorage,
    job_id: str,
    images: list[Any],
    params: GenerationParams,
    stage_seconds: list[float],
) -> list[OutputRecord]:
    outputs = []
    for index, image in enumerate(images):
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format=PIL_FORMATS[params.output_format])
        data = buffer.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        key = object_key(job_id, index, params.output_format)
        metadata = {
            "job-id": job_id,
            "seed": str(params.seed),
            "sha256": digest,
            "stage-seconds": json.dumps([round(s, 4) for s in stage_seconds]),
            # Object metadata must be short ASCII (S3 headers): the prompt is not repeated here.
            "params": params.model_dump_json(exclude={"prompt", "negative_prompt"}),
        }
        stored = storage.put(key, data, CONTENT_TYPES[params.output_format], metadata)
        outputs.append(
            OutputRecord(
                index=index,
                key=key,
                width=image.width,
                height=image.height,
                format=params.output_format,
                bytes=stored.bytes,
                sha256=digest,
            )
        )
    return outputs
