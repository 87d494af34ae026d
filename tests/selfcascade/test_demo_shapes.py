"""The procedural shapes data set: seeded, inside its grammar, exact at any size."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from selfcascade.demo.shapes import (
    BACKGROUND,
    COUNT_WORDS,
    MAX_GROUPS,
    MAX_OBJECTS,
    Caption,
    ObjectGroup,
    parse_caption,
    render,
    sample_example,
)


def test_examples_are_a_function_of_seed_and_index() -> None:
    assert sample_example(7, 3) == sample_example(7, 3)
    _, scene = sample_example(7, 3)
    assert render(scene, 64).tobytes() == render(scene, 64).tobytes()
    different = {sample_example(7, i)[1] for i in range(20)} | {sample_example(8, 0)[1]}
    assert len(different) == 21


def test_captions_follow_the_grammar_and_round_trip() -> None:
    seen = set()
    for i in range(500):
        caption, scene = sample_example(0, i)
        seen.add(caption.text)
        assert 1 <= len(caption.groups) <= MAX_GROUPS
        assert caption.object_count <= MAX_OBJECTS
        assert len({(g.colour, g.shape) for g in caption.groups}) == len(caption.groups)
        assert parse_caption(caption.text) == caption
        assert len(scene.objects) == caption.object_count
        assert sorted((o.colour, o.shape) for o in scene.objects) == sorted(
            caption.objects().elements()
        )
    assert {"a red circle", "two blue squares"} & seen
    assert any(" and " in text for text in seen)
    assert any(text.startswith("three ") for text in seen)


def test_caption_text_reads_as_english() -> None:
    caption = Caption((ObjectGroup("yellow", "triangle", 1), ObjectGroup("green", "square", 2)))
    assert caption.text == "a yellow triangle and two green squares"
    assert COUNT_WORDS[3] == "three"
    with pytest.raises(ValueError):
        parse_caption("a purple circle")


def test_objects_never_overlap_and_stay_inside() -> None:
    for i in range(300):
        _, scene = sample_example(1, i)
        for obj in scene.objects:
            assert obj.half_size < obj.cx < 1 - obj.half_size
            assert obj.half_size < obj.cy < 1 - obj.half_size
        for a, b in itertools.combinations(scene.objects, 2):
            reach = (a.half_size + b.half_size) * math.sqrt(2)
            assert math.hypot(a.cx - b.cx, a.cy - b.cy) > reach


@pytest.mark.parametrize("size", [64, 96, 256])
def test_render_draws_the_scene_at_any_size(size: int) -> None:
    _, scene = sample_example(2, 5)
    pixels = np.asarray(render(scene, size))
    assert pixels.shape == (size, size, 3)
    assert tuple(pixels[0, 0]) == BACKGROUND
    # Anti-aliased: edge pixels between background and colour exist, not just the palette.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1 + len(scene.objects)
    coverage = (np.abs(pixels.astype(int) - BACKGROUND).sum(axis=-1) > 60).mean()
    expected = sum(
        {"circle": math.pi, "square": 4.0, "triangle": 2.0}[o.shape] * o.half_size**2
        for o in scene.objects
    )
    assert coverage == pytest.approx(expected, rel=0.1)
