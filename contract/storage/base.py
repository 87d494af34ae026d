"""The storage interface. Object keys come from job ids only, never from user input."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_JOB_ID = re.compile(r"^[a-f0-9]{32}$")
CONTENT_TYPES = {
    "png": "image/png",
    "webp": "image/webp",
    "jpeg": "image/jpeg",
    "mp4": "video/mp4",
    "webm": "video/webm",
    "gif": "image/gif",
}


class StorageUnavailable(OSError):
    """A backend could not store an object (unreachable, refused, out of space): the job's
    result is lost to this outage, not to the request, so it fails as storage_unavailable."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    bytes: int
    content_type: str


def object_key(job_id: str, index: int, fmt: str) -> str:
    """`<job id>/<index>.<ext>`; refuses anything that is not one of our job ids."""
    if not _JOB_ID.match(job_id) or fmt not in CONTENT_TYPES or index < 0:
        raise ValueError(f"not a valid result key: {job_id!r} {index} {fmt!r}")
    return f"{job_id}/{index}.{fmt}"


class ResultStorage(ABC):
    """Write-once result objects with metadata, readable by key, expiring after a TTL."""

    # Whether presigned_url gives links that need no API key (else downloads go through the API).
    presigns: bool = False

    @abstractmethod
    def put(
        self, key: str, data: bytes, content_type: str, metadata: dict[str, str]
    ) -> StoredObject:
        """Store `data` under `key` with small string metadata (seed, sha256, timings...);
        `StorageUnavailable` when the backend cannot."""

    @abstractmethod
    def open(self, key: str) -> Iterator[bytes]:
        """The object's bytes in chunks; raises FileNotFoundError when it is gone."""

    @abstractmethod
    def metadata(self, key: str) -> dict[str, str]:
        """The metadata written with `put`."""

    def local_path(self, key: str) -> Path | None:
        """The object's file when this backend keeps it on the API's disk (served from there,
        with Range and conditional requests), or None."""
        return None

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        """A URL clients can fetch directly, or None when the backend serves through the API."""
        return None

    @abstractmethod
    def delete_older_than(self, cutoff: float) -> int:
        """Delete results written before the unix time `cutoff`; returns how many objects."""

    @abstractmethod
    def check(self) -> None:
        """Raise if the backend cannot be reached (used at start-up and by /readyz)."""
