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
def replacing(path: Path, partial: Path | None = None) -> Iterator[IO[bytes]]:
    """A new file beside `path` to write into, moved onto `path` only once all of it is written
    (the client's downloads too): a write that fails (a full disk) leaves neither a truncated
    file at `path` nor spoils the one there. The partial file is removed on any failure.

    By default the partial file's name is new each time; a writer that holds its folder alone
    may name it (`replace_file`), so that one a killed writer left is overwritten by the next."""
    if partial is None:
        # Beside it, so os.replace is a rename on one file system; not tempfile's, made 0600.
        partial, mode = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part"), "xb"
    else:
        mode = "wb"
    try:
        with partial.open(mode) as out:
            yield out
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a folder of that name, say: the error says more
            partial.unlink(missing_ok=True)
        raise


def replace_file(path: Path, data: bytes) -> None:
    """`data` written to `path` through `replacing`, the partial file named `<name>.tmp`: a
    write cut short (a full disk, a second Ctrl-C) leaves the file there whole. For the files a
    tuning run and its checkpoints write, each in a folder of its own."""
    with replacing(path, partial=path.with_name(path.name + ".tmp")) as out:
        out.write(data)
