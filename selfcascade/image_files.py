"""Reading training images and frames: every unreadable file becomes one `InvalidRequest`
naming it, so a bad data folder fails before any tuning step runs."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from selfcascade.errors import InvalidRequest


def image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            image.verify()  # catches truncated files that open() alone accepts
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise InvalidRequest("data", f"{path} is not a readable image: {exc}") from exc


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise InvalidRequest("data", f"{path} is not a readable image: {exc}") from exc
