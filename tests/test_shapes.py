"""The shapes world: a deterministic generator, and an evaluator that reads it back exactly."""

from __future__ import annotations

import numpy as np
import pytest

from pyinv.shapes import COLORS, SHAPES, Scene, read, render, sample_scene, shape_mask
from pyinv.shapes.world import MARGIN


def test_generator_is_deterministic_and_varied():
    a = [sample_scene(seed) for seed in range(200)]
    b = [sample_scene(seed) for seed in range(200)]
    assert a == b
    assert all(
        np.array_equal(np.asarray(render(x)), np.asarray(render(y))) for x, y in zip(a[:20], b[:20], strict=True)
    )
    assert {s.shape for s in a} == set(SHAPES)
    assert {s.color for s in a} == set(COLORS) and {s.background for s in a} == set(COLORS)
    assert len({(round(s.center[0], 3), round(s.size, 3)) for s in a}) == 200  # positions and sizes vary


def test_every_colour_name_of_the_issue_exists():
    assert {"red", "orange", "yellow", "green", "blue", "purple", "white", "black"} <= set(COLORS)
    assert {"circle", "square", "triangle"} <= set(SHAPES)


def test_scene_caption_and_validation():
    scene = Scene("circle", "red", "blue")
    assert scene.caption == "a red circle on a blue background"
    assert scene.with_(shape="square").caption == "a red square on a blue background"
    for bad in (dict(shape="star"), dict(color="pink"), dict(color="blue")):
        with pytest.raises(ValueError):
            Scene(**{"shape": "circle", "color": "red", "background": "blue", **bad})


@pytest.mark.parametrize("side", [32, 64])
def test_shapes_stay_inside_the_image(side):
    for seed in range(300):
        scene = sample_scene(seed)
        mask = shape_mask(scene, side)
        assert mask.sum() > 0.01 * side * side
        edge = max(1, int(MARGIN * side) - 1)
        assert not mask[:edge].any() and not mask[-edge:].any() and not mask[:, :edge].any()
        assert not mask[:, -edge:].any()


@pytest.mark.parametrize("side", [32, 64])
def test_evaluator_reads_rendered_images_exactly(side):
    for seed in range(400):
        scene = sample_scene(seed)
        reading = read(render(scene, side))
        assert reading.matches(scene.shape, scene.color, scene.background), (seed, scene, reading.fill)
        truth = shape_mask(scene, side)
        assert np.array_equal(reading.mask, truth)
        ys, xs = np.nonzero(truth)
        assert reading.centroid == pytest.approx(((ys.mean() + 0.5) / side, (xs.mean() + 0.5) / side))
        assert reading.size == pytest.approx(np.sqrt(truth.sum()) / side)


def test_evaluator_tolerates_pixel_noise():
    rng = np.random.default_rng(0)
    correct = 0
    for seed in range(200):
        scene = sample_scene(50_000 + seed)
        noisy = np.asarray(render(scene), dtype=np.float64) + rng.normal(0, 10, (32, 32, 3))
        correct += read(np.clip(noisy, 0, 255)).matches(scene.shape, scene.color, scene.background)
    assert correct >= 196


def test_evaluator_reports_no_shape_on_a_plain_image():
    plain = np.zeros((32, 32, 3), dtype=np.uint8)
    plain[...] = COLORS["green"]
    reading = read(plain)
    assert reading.background == "green" and reading.shape is None and reading.color is None
