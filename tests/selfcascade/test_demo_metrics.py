"""The shapes metrics: exact on ground truth, strict about the failures self-cascade targets."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest

from selfcascade.demo.metrics import (
    composition_correct,
    detect_objects,
    label_components,
    mean_edge_width,
)
from selfcascade.demo.shapes import (
    BACKGROUND,
    Scene,
    ShapeObject,
    parse_caption,
    render,
    sample_example,
)


@pytest.mark.parametrize(("size", "captions"), [(64, 300), (128, 200), (256, 100)])
def test_composition_is_exact_on_ground_truth_renders(size: int, captions: int) -> None:
    wrong = [
        caption.text
        for caption, scene in (sample_example(11, i) for i in range(captions))
        if not composition_correct(render(scene, size), caption)
    ]
    assert wrong == []


def _scene(*objects: tuple[str, str, float, float, float]) -> PIL.Image.Image:
    return render(Scene(tuple(ShapeObject(*o) for o in objects)), 128)


def test_a_cluster_of_small_circles_is_not_a_circle() -> None:
    cluster = _scene(
        ("red", "circle", 0.50, 0.44, 0.08),
        ("red", "circle", 0.44, 0.55, 0.08),
        ("red", "circle", 0.56, 0.55, 0.08),
    )
    assert not composition_correct(cluster, parse_caption("a red circle"))
    blob_of_squares = _scene(
        ("blue", "square", 0.5, 0.5, 0.1), ("blue", "square", 0.62, 0.58, 0.08)
    )
    assert not composition_correct(blob_of_squares, parse_caption("a blue square"))


def test_repeated_and_missing_objects_are_wrong() -> None:
    one = ("yellow", "triangle", 0.3, 0.3, 0.15)
    small_copy = ("yellow", "triangle", 0.75, 0.75, 0.04)
    caption = parse_caption("a yellow triangle")
    assert composition_correct(_scene(one), caption)
    assert not composition_correct(_scene(one, small_copy), caption)
    assert not composition_correct(_scene(), caption)
    assert not composition_correct(_scene(("green", "triangle", 0.3, 0.3, 0.15)), caption)
    assert not composition_correct(_scene(("yellow", "circle", 0.3, 0.3, 0.15)), caption)


def test_detection_ignores_a_tinted_canvas() -> None:
    image = np.asarray(_scene(("green", "square", 0.5, 0.5, 0.2))).astype(int)
    tinted = np.clip(image + np.array([-12, -20, 10]), 0, 255).astype(np.uint8)
    assert detect_objects(PIL.Image.fromarray(tinted)) == {("green", "square"): 1}


def test_components_are_eight_connected() -> None:
    mask = np.zeros((6, 6), dtype=bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours: one component
    mask[4, 0:3] = True
    mask[0:3, 5] = True
    sizes = sorted(sum(e - s for _, s, e in runs) for runs in label_components(mask))
    assert sizes == [2, 3, 3]


@pytest.mark.parametrize("size", [64, 128, 256])
def test_a_render_is_crisper_than_its_bicubic_upscale(size: int) -> None:
    for index in range(10):
        _, scene = sample_example(12, index)
        native = mean_edge_width(render(scene, size))
        upscaled = render(scene, size // 2).resize((size, size), PIL.Image.Resampling.BICUBIC)
        assert mean_edge_width(upscaled) > 1.4 * native


def test_edge_width_of_an_empty_canvas_is_undefined() -> None:
    assert math.isnan(mean_edge_width(PIL.Image.new("RGB", (64, 64), BACKGROUND)))
