"""Results as files under one directory; metadata in a JSON file beside each object."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from contract.storage.base import ResultStorage, StorageUnavailable, StoredObject

CHUNK = 256 * 1024


class LocalResultStorage(ResultStorage):
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        # Keys are built by object_key(); this guards the read path against anything else.
        if self.root not in path.parents:
            raise FileNotFoundError(key)
        return path

    def put(
        self, key: str, data: bytes, content_type: str, metadata: dict[str, str]
    ) -> StoredObject:
        path = self._path(key)
        meta = dict(metadata, content_type=content_type)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path.with_suffix(path.suffix + ".json"), json.dumps(meta).encode())
            _atomic_write(path, data)
        except OSError as exc:  # disk full, read-only mount, permissions
            raise StorageUnavailable(f"cannot write {key} under {self.root}: {exc}") from exc
        return StoredObject(key=key, bytes=len(data), content_type=content_type)

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def open(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        handle = path.open("rb")  # raises FileNotFoundError before the first chunk is promised

        def chunks() -> Iterator[bytes]:
            with handle:
                while block := handle.read(CHUNK):
                    yield block

        return chunks()

    def metadata(self, key: str) -> dict[str, str]:
        path = self._path(key)
        return json.loads(path.with_suffix(path.suffix + ".json").read_text())  # type: ignore[no-any-return]

    def delete_older_than(self, cutoff: float) -> int:
        removed = 0
        if not self.root.exists():
            return 0
        for path in self.root.glob("*/*"):
            try:
                if path.suffix != ".json" and path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
                    path.with_suffix(path.suffix + ".json").unlink(missing_ok=True)
                    removed += 1
            except OSError:
                continue  # gone or busy: the next sweep sees it again
        for folder in self.root.iterdir():
            try:
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            except OSError:
                continue  # a job wrote into it meanwhile
        return removed

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise PermissionError(f"results directory {self.root} is not writable")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write then rename, so a reader never streams a half-written image."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)
