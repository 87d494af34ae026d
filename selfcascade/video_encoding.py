"""Frames -> the bytes of a video file: mp4 (H.264) and webm (VP9) through PyAV, gif through Pillow.
The worker stores these for video jobs; `selfcascade generate` writes them for a clip's --out.

PyAV's wheels bundle FFmpeg with libx264 and libvpx, so nothing outside PyPI is needed. Both
video codecs get yuv420p, the one chroma layout every browser and phone decodes; it halves the
chroma resolution, so H.264 needs even sizes (the API refuses odd ones for mp4).
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image

# container format, codec, codec options, container options
_FFMPEG_SETTINGS: dict[str, tuple[str, str, dict[str, str], dict[str, str]]] = {
    # crf 18 is visually lossless for x264; faststart puts the index first so a browser can
    # start playing before the whole file has arrived.
    "mp4": ("mp4", "libx264", {"crf": "18", "preset": "medium"}, {"movflags": "+faststart"}),
    # b=0 makes crf the quality target (libvpx's constant-quality mode); row-mt and cpu-used 4
    # keep it fast enough for a worker that is waiting on it between two jobs.
    "webm": (
        "webm",
        "libvpx-vp9",
        {"crf": "30", "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"},
        {},
    ),
}


class VideoEncodingError(ValueError):
    """Frames that cannot make a video of the asked format (empty, mixed sizes, odd for mp4)."""


def encode_video(frames: Sequence[Image.Image], fmt: str, fps: int) -> bytes:
    """Every frame, in order, at `fps` frames a second, as one file of format `fmt`."""
    if fmt not in _ENCODERS:
        raise VideoEncodingError(f"not a video format: {fmt!r}")
    if not frames:
        raise VideoEncodingError("no frames to encode")
    if fps <= 0:
        raise VideoEncodingError(f"fps must be positive, got {fps}")
    sizes = {frame.size for frame in frames}
    if len(sizes) != 1:
        raise VideoEncodingError(f"frames differ in size: {sorted(sizes)}")
    return _ENCODERS[fmt](frames, fmt, fps)


def _encode_ffmpeg(frames: Sequence[Image.Image], fmt: str, fps: int) -> bytes:
    width, height = frames[0].size
    if width % 2 or height % 2:
        raise VideoEncodingError(f"{fmt} with yuv420p needs even sizes, got {width}x{height}")
    # A real file, not BytesIO: faststart rewrites the file by name once it is complete.
    with tempfile.TemporaryDirectory(prefix="selfcascade-video-") as folder:
        path = Path(folder) / f"out.{fmt}"
        try:
            _mux(frames, path, fmt, fps)
        except av.FFmpegError as exc:
            # Some FFmpeg errors are OSErrors, which the job would report as a storage outage.
            raise VideoEncodingError(f"{fmt} encoding failed: {exc}") from exc
        return path.read_bytes()


def _mux(frames: Sequence[Image.Image], path: Path, fmt: str, fps: int) -> None:
    container_format, codec, options, container_options = _FFMPEG_SETTINGS[fmt]
    width, height = frames[0].size
    with av.open(str(path), mode="w", format=container_format, options=container_options) as out:
        stream = out.add_stream(codec, rate=fps, options=options)
        assert isinstance(stream, av.VideoStream)  # a video codec name gives a video stream
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_image(image.convert("RGB"))
            frame.pts = index  # one tick of 1/fps per frame: a constant frame rate
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))  # flush the frames the encoder still holds


def _encode_gif(frames: Sequence[Image.Image], fmt: str, fps: int) -> bytes:
    # Pillow quantises each frame to its own 256-colour palette (FFmpeg's gif encoder would use
    # a fixed one) and, where two consecutive frames are identical, stores one with both delays:
    # the animation plays the same, with fewer frames in the file.
    buffer = io.BytesIO()
    first, *rest = (image.convert("RGB") for image in frames)
    first.save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=rest,
        duration=gif_delays_ms(len(frames), fps),
        loop=0,
    )
    return buffer.getvalue()


def gif_delays_ms(count: int, fps: int) -> list[int]:
    """Per-frame delays in whole hundredths of a second (all GIF can store) that add up to the
    clip's true length: at 8 fps, 120 and 130 ms alternate instead of every frame losing 5 ms."""
    ends = [round((i + 1) * 100 / fps) for i in range(count)]
    return [10 * (end - start) for start, end in zip([0, *ends], ends, strict=False)]


_ENCODERS: dict[str, Callable[[Sequence[Image.Image], str, int], bytes]] = {
    "mp4": _encode_ffmpeg,
    "webm": _encode_ffmpeg,
    "gif": _encode_gif,
}
