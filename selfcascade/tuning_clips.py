"""Short clips to tune a video model's feature upsamplers on.

A data folder holds clips, each either a folder of frames (image files, in name order) or a
video file that PyAV decodes (the worker extra installs it). A clip's caption is an optional
same-name .txt next to it (`walk/` + `walk.txt`, `walk.mp4` + `walk.txt`). Every clip is
checked once up front: enough frames for one training window, frames at least the crop size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from selfcascade.errors import InvalidRequest
from selfcascade.image_files import image_size, load_rgb

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")


@dataclass(frozen=True)
class Clip:
    path: Path  # a frame folder or a video file
    frame_count: int
    width: int
    height: int
    caption: str


@dataclass(frozen=True)
class TuningClips:
    """Clips sampled as random windows of `frames` consecutive frames, one random crop each."""

    clips: tuple[Clip, ...]
    crop_size: int
    frames: int

    @classmethod
    def scan(cls, data_dir: Path, crop_size: int, frames: int) -> TuningClips:
        if not data_dir.is_dir():
            raise InvalidRequest("data", f"{data_dir} is not a directory")
        paths = sorted(
            p for p in data_dir.iterdir() if p.is_dir() or p.suffix.lower() in VIDEO_SUFFIXES
        )
        if not paths:
            raise InvalidRequest(
                "data",
                f"no clips in {data_dir}: expected frame folders or video files "
                f"({', '.join(VIDEO_SUFFIXES)})",
            )
        clips = []
        for path in paths:
            clip = _describe(path)
            if clip.frame_count < frames:
                raise InvalidRequest(
                    "data", f"{path} has {clip.frame_count} frames, fewer than the {frames} asked"
                )
            if min(clip.width, clip.height) < crop_size:
                raise InvalidRequest(
                    "data",
                    f"{path} is {clip.width}x{clip.height}, smaller than the "
                    f"{crop_size}x{crop_size} crop",
                )
            clips.append(clip)
        return cls(tuple(clips), crop_size, frames)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """Random windows, random crops: pixels in [-1, 1], shape (B, F, 3, S, S)."""
        picks = torch.randint(len(self.clips), (batch_size,), generator=generator).tolist()
        windows = []
        for i in picks:
            clip = self.clips[i]
            start = _randint(clip.frame_count - self.frames + 1, generator)
            top = _randint(clip.height - self.crop_size + 1, generator)
            left = _randint(clip.width - self.crop_size + 1, generator)
            box = (left, top, left + self.crop_size, top + self.crop_size)
            frames = [
                _to_pixels(frame.crop(box), self.crop_size)
                for frame in read_frames(clip.path, start, self.frames)
            ]
            windows.append(torch.stack(frames))  # (F, 3, S, S)
        return torch.stack(windows), [self.clips[i].caption for i in picks]


def read_frames(path: Path, start: int = 0, count: int | None = None) -> list[Image.Image]:
    """Frames start..start+count-1 of a clip as RGB images (all of them when count is None)."""
    stop = None if count is None else start + count
    if path.is_dir():
        return [load_rgb(p) for p in _frame_files(path)[start:stop]]
    return _decode_video(path)[start:stop]


def _describe(path: Path) -> Clip:
    caption_file = path.with_suffix(".txt") if path.is_file() else path.parent / f"{path.name}.txt"
    caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
    if path.is_dir():
        files = _frame_files(path)
        if not files:
            raise InvalidRequest("data", f"clip folder {path} holds no frames")
        sizes = {image_size(p) for p in files}
        if len(sizes) > 1:
            raise InvalidRequest("data", f"clip folder {path} mixes frame sizes {sorted(sizes)}")
        width, height = sizes.pop()
        return Clip(path, len(files), width, height, caption)
    video = _decode_video(path)
    if not video:
        raise InvalidRequest("data", f"video {path} has no frames")
    return Clip(path, len(video), video[0].width, video[0].height, caption)


def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)


def _decode_video(path: Path) -> list[Image.Image]:
    """Every frame of a video file (short clips: decoded whole); PyAV is imported only when a
    data folder holds videos."""
    try:
        import av
    except ImportError as exc:
        raise InvalidRequest(
            "data", f"{path} is a video file; reading one needs PyAV (pip install av)"
        ) from exc
    try:
        with av.open(str(path)) as container:
            return [frame.to_image().convert("RGB") for frame in container.decode(video=0)]
    except (av.FFmpegError, ValueError, IndexError) as exc:  # IndexError: no video stream
        raise InvalidRequest("data", f"{path} is not a readable video: {exc}") from exc


def _randint(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(high, (1,), generator=generator))


def _to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(size, size, 3).permute(2, 0, 1)  # (3, S, S)
    return pixels.float() / 127.5 - 1.0
