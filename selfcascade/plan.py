"""Stage planning: from a target size to the sizes the cascade samples at.

Pure arithmetic, no torch. The base stage has the model's native pixel count at the target's
aspect ratio; each later stage grows at most 2x per side (4x the pixels, the paper's rule), the
last one included, and the last stage is exactly the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_GROWTH_PER_SIDE = 2.0


@dataclass(frozen=True)
class StageSize:
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def plan_stages(
    width: int, height: int, native_width: int, native_height: int, multiple: int
) -> list[StageSize]:
    """Sizes of every stage, smallest first; the last is (width, height).

    `multiple` is the granularity intermediate sizes are rounded to (for SD: the VAE factor times
    2 ** UNet down-levels = 64 px), so the UNet sees clean shapes. The target itself is returned
    unchanged: whether it is an accepted size is the request validator's business.
    """
    target = StageSize(width, height)
    native_pixels = native_width * native_height
    if target.pixels <= native_pixels:
        return [target]

    aspect = width / height
    base = StageSize(
        _round_to(math.sqrt(native_pixels * aspect), multiple, upper=width),
        _round_to(math.sqrt(native_pixels / aspect), multiple, upper=height),
    )
    # Stages after the base: enough that no step grows a side more than 2x.
    growth = max(width / base.width, height / base.height)
    upscales = max(1, math.ceil(math.log(growth, MAX_GROWTH_PER_SIDE) - 1e-9))

    sizes = [base]
    for i in range(1, upscales):
        f = i / upscales
        w = _round_to(base.width * (width / base.width) ** f, multiple, upper=width)
        h = _round_to(base.height * (height / base.height) ** f, multiple, upper=height)
        prev, left = sizes[-1], upscales - i  # stages still to come after this one
        # Rounding may break the 2x rule by a fraction of `multiple`, on either side of this
        # stage: at most 2x the previous one, at least what the target is 2 ** left x of. The two
        # never conflict: the previous stage met the second bound, and 2x it is a multiple.
        w = max(min(w, _floor_to(prev.width * MAX_GROWTH_PER_SIDE, multiple)),
                _ceil_to(width / MAX_GROWTH_PER_SIDE**left, multiple, upper=width))
        h = max(min(h, _floor_to(prev.height * MAX_GROWTH_PER_SIDE, multiple)),
                _ceil_to(height / MAX_GROWTH_PER_SIDE**left, multiple, upper=height))
        sizes.append(StageSize(w, h))
    sizes.append(target)
    return _drop_repeats(sizes)


def _round_to(value: float, multiple: int, upper: int) -> int:
    """Nearest multiple, at least one multiple, never above `upper` (when upper allows)."""
    rounded = max(multiple, round(value / multiple) * multiple)
    return min(rounded, max(upper, multiple)) if rounded > upper else rounded


def _floor_to(value: float, multiple: int) -> int:
    return max(multiple, int(value // multiple) * multiple)


def _ceil_to(value: float, multiple: int, upper: int) -> int:
    return min(max(multiple, math.ceil(value / multiple - 1e-9) * multiple), upper)


def _drop_repeats(sizes: list[StageSize]) -> list[StageSize]:
    kept = [sizes[0]]
    for s in sizes[1:]:
        if s != kept[-1]:
            kept.append(s)
    return kept
