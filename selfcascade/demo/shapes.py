"""The procedural data set: captions from a small grammar and scenes rendered exactly at any size.

A caption names at most two object groups ("a red circle", "two blue squares", "a yellow
triangle and a green square") with at most `MAX_OBJECTS` objects in all. A scene places those
objects at normalised, non-overlapping positions; `render` draws it anti-aliased at any
resolution, so the ground truth of a sample exists at every scale the benchmark asks for.
Everything is a pure function of a seed.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (35, 160, 60),
    "blue": (40, 70, 215),
    "yellow": (235, 195, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (242, 240, 235)
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
MAX_OBJECTS = 3
MAX_GROUPS = 2
# Object half-size (fraction of the image side) by how many objects share the image: fewer
# objects may be larger; the smallest is still ~14 px across at a 64 px native size.
HALF_SIZE_RANGE: dict[int, tuple[float, float]] = {
    1: (0.14, 0.26),
    2: (0.12, 0.20),
    3: (0.11, 0.16),
}
# Clear space between objects and to the border, so anti-aliased edges never touch.
GAP = 0.05
SUPERSAMPLE = 4

Colour = str
Shape = str


@dataclass(frozen=True)
class ObjectGroup:
    colour: Colour
    shape: Shape
    count: int

    @property
    def text(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun}"


@dataclass(frozen=True)
class Caption:
    groups: tuple[ObjectGroup, ...]

    @property
    def text(self) -> str:
        return " and ".join(group.text for group in self.groups)

    def objects(self) -> Counter[tuple[Colour, Shape]]:
        """The multiset of (colour, shape) the caption asks for."""
        return Counter({(g.colour, g.shape): g.count for g in self.groups})

    @property
    def object_count(self) -> int:
        return sum(g.count for g in self.groups)


@dataclass(frozen=True)
class ShapeObject:
    """One object; centre and half-size are fractions of the image side."""

    colour: Colour
    shape: Shape
    cx: float
    cy: float
    half_size: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]


def grammar_words() -> list[str]:
    """Every word a caption can contain."""
    words = [*COUNT_WORDS.values(), *COLOURS, *SHAPES, *(s + "s" for s in SHAPES), "and"]
    return list(dict.fromkeys(words))


_GROUP_PATTERN = re.compile(
    r"^(?P<count>a|two|three) (?P<colour>\w+) (?P<shape>circle|square|triangle)s?$"
)


def parse_caption(text: str) -> Caption:
    """The inverse of `Caption.text`; `ValueError` for anything outside the grammar."""
    counts = {word: n for n, word in COUNT_WORDS.items()}
    groups = []
    for part in text.strip().lower().split(" and "):
        match = _GROUP_PATTERN.match(part.strip())
        if match is None or match["colour"] not in COLOURS:
            raise ValueError(f"not a caption of the shapes grammar: {text!r}")
        groups.append(ObjectGroup(match["colour"], match["shape"], counts[match["count"]]))
    return Caption(tuple(groups))


def sample_caption(rng: np.random.Generator) -> Caption:
    """One or two groups of distinct (colour, shape), at most `MAX_OBJECTS` objects in all."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    if rng.random() < 0.5:
        (colour, shape), count = pairs[rng.integers(len(pairs))], int(rng.choice([1, 2, 3]))
        return Caption((ObjectGroup(colour, shape, count),))
    first, second = rng.choice(len(pairs), size=2, replace=False)
    counts = [(1, 1), (1, 2), (2, 1)][rng.integers(3)]
    return Caption(
        tuple(
            ObjectGroup(pairs[p][0], pairs[p][1], n)
            for p, n in zip((first, second), counts, strict=True)
        )
    )


def sample_scene(caption: Caption, rng: np.random.Generator) -> Scene:
    """Place the caption's objects without overlap (rejection sampling, shrinking if stuck)."""
    kinds = [(g.colour, g.shape) for g in caption.groups for _ in range(g.count)]
    low, high = HALF_SIZE_RANGE[len(kinds)]
    shrink = 1.0
    while True:
        placed: list[ShapeObject] = []
        for colour, shape in kinds:
            obj = _place(colour, shape, rng.uniform(low, high) * shrink, placed, rng)
            if obj is None:
                break
            placed.append(obj)
        if len(placed) == len(kinds):
            return Scene(tuple(placed))
        shrink *= 0.95


def _place(
    colour: Colour,
    shape: Shape,
    half: float,
    placed: list[ShapeObject],
    rng: np.random.Generator,
    tries: int = 100,
) -> ShapeObject | None:
    # A square's corners reach half * sqrt(2) from its centre: keep those circles apart.
    reach = half * math.sqrt(2)
    for _ in range(tries):
        cx, cy = rng.uniform(half + GAP, 1 - half - GAP, size=2)
        if all(
            math.hypot(cx - o.cx, cy - o.cy) >= reach + o.half_size * math.sqrt(2) + GAP
            for o in placed
        ):
            return ShapeObject(colour, shape, float(cx), float(cy), float(half))
    return None


def sample_example(seed: int, index: int = 0) -> tuple[Caption, Scene]:
    """Example `index` of the data set drawn from `seed`; independent of every other index."""
    rng = np.random.default_rng([seed, index])
    caption = sample_caption(rng)
    return caption, sample_scene(caption, rng)


def render(scene: Scene, size: int, supersample: int = SUPERSAMPLE) -> PIL.Image.Image:
    """Draw `scene` at `size` x `size` px, anti-aliased by drawing larger and box-downscaling."""
    big = size * supersample
    image = PIL.Image.new("RGB", (big, big), BACKGROUND)
    draw = PIL.ImageDraw.Draw(image)
    for obj in scene.objects:
        # PIL fills up to and including the end pixel: shift by half a pixel to stay centred.
        left, top = (obj.cx - obj.half_size) * big, (obj.cy - obj.half_size) * big
        right, bottom = (obj.cx + obj.half_size) * big - 1, (obj.cy + obj.half_size) * big - 1
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:
            draw.polygon(
                [((left + right) / 2, top), (left, bottom), (right, bottom)], fill=fill
            )
    return image.reduce(supersample) if supersample > 1 else image
