"""What each output format's encoder accepts: the longest side, and a clip's frame rate.

Torch-free, so that the API (contract, service) and the command line check a request against
the same numbers before a whole cascade is spent on a file that cannot be written.
"""

from __future__ import annotations

# A clip's frame rate unless asked otherwise (a model's spec may name its own), and its bounds.
DEFAULT_FPS = 8
MAX_FPS = 60
# GIF stores delays in hundredths of a second, and browsers play 10 ms or less as 100 ms: 20 ms
# frames (video_encoding.gif_delays_ms never goes below that up to 50 fps) are the fastest.
GIF_MAX_FPS = 50

# The longest side each format's encoder takes, in px (the worker's Pillow and PyAV, measured):
# WebP stores 14-bit sizes; libjpeg stops at 65500 although JPEG has 16 bits; GIF has 16 bits;
# libx264 takes up to 16384 and VP9 up to 65536. PNG (a clip's poster too) has no limit a pixel
# budget could reach.
MAX_SIDE_PX: dict[str, int] = {
    "webp": 16383, "jpeg": 65500, "gif": 65535, "mp4": 16384, "webm": 65536,
}


def size_problem(fmt: str, width: int, height: int) -> tuple[str, str] | None:
    """Why `fmt` cannot encode a width x height output, as (param, message), or None."""
    max_side = MAX_SIDE_PX.get(fmt)
    for param, value in (("width", width), ("height", height)):
        if max_side is not None and value > max_side:
            return param, f"{fmt} allows at most {max_side} px per side, got {value}"
        if fmt == "mp4" and value % 2:
            return param, f"mp4 (H.264, 4:2:0) needs an even {param}, got {value}"
    return None
