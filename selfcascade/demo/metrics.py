"""Composition accuracy and edge crispness of shapes images, in pure numpy.

Composition: every pixel is matched to the palette colour whose direction from the background
it lies on (anti-aliased edge pixels lie on the segment background -> colour, so they never read
as a third colour), pixels at least half-way to that colour are object pixels, and each
connected component is classified by its overlap with the ideal circle, square and triangle
drawn in its bounding box; one that matches none counts as a "blob", which no caption holds. So
a circle drawn as a cluster of small circles is wrong, and so is a scatter of extra small
copies, since even small components count (the toy-scale findings this project started from
list these among the pitfalls of a per-colour component count).

Crispness: the mean 10%-90% rise width, in pixels, of the profiles across object edges. A
natively rendered anti-aliased edge rises in about one pixel; an upscaled one in about `scale`.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageDraw

from selfcascade.demo.shapes import COLOURS, SHAPES, Caption

PALETTE_NAMES: tuple[str, ...] = tuple(COLOURS)
PALETTE = np.array([COLOURS[name] for name in PALETTE_NAMES], dtype=np.float64)  # (K, 3)
# A pixel's colour is the palette colour whose direction from the background is closest; beyond
# this angle it is no palette colour at all (the palette's closest pair is ~34 degrees apart).
MAX_COLOUR_ANGLE_COS = 0.9
OBJECT_ALPHA = 0.5
# Components smaller than this fraction of the image are noise. The smallest object of the
# grammar covers ~2.4% of the image, a small extra copy a few tenths of a percent: count those.
MIN_COMPONENT_FRACTION = 0.0015
# Shape classification: the IoU of a component with each ideal shape drawn in its bounding box.
# Exact renders score >= 0.86 (a 14 px triangle at 64 px) and >= 0.93 from 128 px up; a cluster
# of overlapping circles scores ~0.73 as a circle (a 2 x 2 cluster reads as a square at 0.87,
# still not the circle it replaced).
MIN_TEMPLATE_IOU = 0.82
MAX_ASPECT = 1.35
# Edge profiles longer than this (pixels) from 10% to 90% are not edges but gradients.
MAX_EDGE_WIDTH = 16


@dataclass(frozen=True)
class Component:
    colour: str
    shape: str  # circle, square, triangle or "blob"
    area: int
    template_iou: float
    aspect: float


# -- colour segmentation ---------------------------------------------------------------------


def background_colour(pixels: np.ndarray) -> np.ndarray:
    """The median border pixel: objects never touch the border, a model's tinted canvas does."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return np.median(border, axis=0)  # (3,)


def colour_coverage(image: PIL.Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the index of its palette colour (-1: none) and its coverage alpha in [0, 1]."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)  # (H, W, 3)
    offset = pixels - background_colour(pixels)  # (H, W, 3)
    directions = PALETTE - background_colour(pixels)  # (K, 3)
    # Coverage along each colour's segment from the background: 0 background, 1 full colour.
    alphas = offset @ directions.T / (directions**2).sum(axis=1)  # (H, W, K)
    cosines = (offset @ directions.T) / (
        np.linalg.norm(offset, axis=-1, keepdims=True) * np.linalg.norm(directions, axis=1) + 1e-9
    )
    index = cosines.argmax(axis=-1)  # (H, W)
    alpha = np.take_along_axis(alphas, index[..., None], axis=-1)[..., 0].clip(0, 1)
    index = np.where(cosines.max(axis=-1) >= MAX_COLOUR_ANGLE_COS, index, -1)
    return index, np.where(index >= 0, alpha, 0.0)


# -- connected components --------------------------------------------------------------------


def label_components(mask: np.ndarray) -> list[list[tuple[int, int, int]]]:
    """8-connected components of a boolean mask, each as its runs (row, start, end exclusive).

    Union-find over horizontal runs: a few hundred runs per image, not a pixel loop.
    """
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    edges = np.diff(padded, axis=1)  # (H, W + 1): +1 where a run starts, -1 past its end
    run_rows, starts = np.nonzero(edges == 1)  # row-major, so runs come sorted by row
    _, ends = np.nonzero(edges == -1)
    runs = list(zip(run_rows.tolist(), starts.tolist(), ends.tolist(), strict=True))
    bounds = np.searchsorted(run_rows, np.arange(mask.shape[0] + 1))
    rows_runs = [list(range(a, b)) for a, b in itertools.pairwise(bounds.tolist())]
    parent = list(range(len(runs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for above, below in itertools.pairwise(rows_runs):
        i = j = 0
        while i < len(above) and j < len(below):
            _, s1, e1 = runs[above[i]]
            _, s2, e2 = runs[below[j]]
            if s1 <= e2 and s2 <= e1:  # overlapping or diagonally touching
                parent[find(above[i])] = find(below[j])
            if e1 < e2:
                i += 1
            else:
                j += 1
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for index, run in enumerate(runs):
        groups.setdefault(find(index), []).append(run)
    return list(groups.values())


def shape_template(shape: str, width: int, height: int, supersample: int = 4) -> np.ndarray:
    """The ideal `shape` filling a width x height box, as `shapes.render` draws it (boolean)."""
    image = PIL.Image.new("L", (width * supersample, height * supersample), 0)
    right, bottom = width * supersample - 1, height * supersample - 1
    draw = PIL.ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((0, 0, right, bottom), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, right, bottom), fill=255)
    else:
        draw.polygon([(right / 2, 0), (0, bottom), (right, bottom)], fill=255)
    return np.asarray(image.reduce(supersample)) >= 128  # (height, width)


def classify_component(colour: str, runs: list[tuple[int, int, int]]) -> Component:
    """The shape whose ideal form in the component's bounding box overlaps it best (IoU)."""
    top = min(r for r, _, _ in runs)
    left = min(s for _, s, _ in runs)
    height = max(r for r, _, _ in runs) - top + 1
    width = max(e for _, _, e in runs) - left
    mask = np.zeros((height, width), dtype=bool)
    for r, s, e in runs:
        mask[r - top, s - left : e - left] = True
    ious = {}
    for shape in SHAPES:
        template = shape_template(shape, width, height)
        ious[shape] = float((mask & template).sum() / (mask | template).sum())
    best = max(ious, key=ious.__getitem__)
    aspect = max(width, height) / min(width, height)
    shape = best if ious[best] >= MIN_TEMPLATE_IOU and aspect <= MAX_ASPECT else "blob"
    return Component(colour, shape, int(mask.sum()), ious[best], aspect)


# -- composition -----------------------------------------------------------------------------


def detect_components(image: PIL.Image.Image) -> list[Component]:
    """Every object-sized connected component of every palette colour, classified."""
    index, alpha = colour_coverage(image)
    min_area = MIN_COMPONENT_FRACTION * index.size
    found = []
    for k, colour in enumerate(PALETTE_NAMES):
        for runs in label_components((index == k) & (alpha >= OBJECT_ALPHA)):
            if sum(e - s for _, s, e in runs) >= min_area:
                found.append(classify_component(colour, runs))
    return found


def detect_objects(image: PIL.Image.Image) -> Counter[tuple[str, str]]:
    """The multiset of (colour, shape) in the image; unrecognised shapes count as "blob"."""
    return Counter((c.colour, c.shape) for c in detect_components(image))


def composition_correct(image: PIL.Image.Image, caption: Caption) -> bool:
    """True iff the image holds exactly the caption's objects: no more, no fewer, no blobs."""
    return detect_objects(image) == caption.objects()


# -- crispness -------------------------------------------------------------------------------


def edge_widths(image: PIL.Image.Image) -> np.ndarray:
    """10%-90% rise widths (px) of the coverage profile across object edges.

    Rows and columns are scanned; an edge counts on the axis it is most nearly perpendicular
    to (|gradient along| >= 2 |gradient across|), so slanted edges are not measured stretched.
    """
    _, alpha = colour_coverage(image)
    grad_y, grad_x = np.gradient(alpha)
    widths: list[float] = []
    for lines, along, across in ((alpha, grad_x, grad_y), (alpha.T, grad_y.T, grad_x.T)):
        for r, line in enumerate(lines):
            for forward in (True, False):
                profile = line if forward else line[::-1]
                for i in np.flatnonzero((profile[:-1] < 0.5) & (profile[1:] >= 0.5)):
                    c = i if forward else len(line) - 1 - i
                    if abs(along[r, c]) < 2 * abs(across[r, c]):
                        continue
                    width = _rise_width(profile, int(i))
                    if width is not None:
                        widths.append(width)
    return np.array(widths)


def _rise_width(profile: np.ndarray, i: int, slack: float = 0.02) -> float | None:
    """Distance from the 10% to the 90% crossing around a rising 50% crossing at i -> i+1."""
    low = i
    while profile[low] > 0.1:
        if low == 0 or i - low >= MAX_EDGE_WIDTH or profile[low - 1] > profile[low] + slack:
            return None
        low -= 1
    high = i + 1
    while profile[high] < 0.9:
        if (
            high == len(profile) - 1
            or high - i >= MAX_EDGE_WIDTH
            or profile[high + 1] < profile[high] - slack
        ):
            return None
        high += 1
    x10 = low + _fraction(profile[low], profile[low + 1], 0.1)
    x90 = high - 1 + _fraction(profile[high - 1], profile[high], 0.9)
    return x90 - x10


def _fraction(a: float, b: float, level: float) -> float:
    return 0.0 if b == a else float(np.clip((level - a) / (b - a), 0.0, 1.0))


def mean_edge_width(image: PIL.Image.Image) -> float:
    """Mean 10%-90% edge rise width in pixels (lower is crisper); NaN if no clean edge."""
    widths = edge_widths(image)
    return float(widths.mean()) if len(widths) else math.nan
