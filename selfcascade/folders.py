"""Whether a command can write where it was told to, asked before any compute is spent; and
writing there so that a failure spoils nothing."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def why_unwritable(folder: Path) -> str | None:
    """Why files cannot be written into `folder` (made if missing), or None when they can."""
    if folder.exists() and not folder.is_dir():  # mkdir would only say "File exists"
        return "it is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except NotADirectoryError:  # its strerror names no folder
        return "a folder above it is a file"
    except OSError as exc:
        return f"cannot create that folder: {exc.strerror or exc}"
    try:  # by writing there: permission bits say nothing of read-only mounts, or of root
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        # Said of the file: /proc exists, yet answers "No such file or directory" to a new file
        # in it, which said of the folder would be untrue.
        return f"cannot create files there: {exc.strerror or exc}"
    return None


@contextmanager
def replacing(path: Path) -> Iterator[IO[bytes]]:
    """A new file beside `path` to write into, moved onto `path` only once all of it is written
    (the client's downloads too): a write that fails (a full disk) leaves neither a truncated
    file at `path` nor spoils the one there. The partial file is removed on any failure."""
    # Beside it, so os.replace is a rename on one file system; not tempfile's, made 0600.
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with partial.open("xb") as out:
            yield out
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def replace_file(path: Path, data: bytes) -> None:
    """Write `data` beside `path`, then rename it onto `path`: a write cut short (a full disk, a
    second Ctrl-C) leaves the file there whole and no partial one behind. The partial file has
    a fixed name, `<name>.tmp`, so one left by a killed writer is overwritten by the next (the
    writers of these files, a tuning run and its checkpoints, hold their folder alone)."""
    partial = path.with_name(path.name + ".tmp")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a folder of that name, say: the error says more
            partial.unlink(missing_ok=True)
        raise
