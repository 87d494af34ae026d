"""Whether a command can write where it was told to, asked before any compute is spent."""

from __future__ import annotations

import tempfile
from pathlib import Path


def why_unwritable(folder: Path) -> str | None:
    """Why files cannot be written into `folder` (made if missing), or None when they can."""
    if folder.exists() and not folder.is_dir():  # mkdir would only say "File exists"
        return "it is a file, not a folder"
    try:  # by writing there: permission bits say nothing of read-only mounts, or of root
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except NotADirectoryError:  # its strerror names no folder
        return "a folder above it is a file"
    except OSError as exc:
        return str(exc.strerror or exc)
    return None
