"""The shapes world's renderer: deterministic, with ground truth that the judge reads back."""

from __future__ import annotations

import numpy as np
import pytest

from digin_cli.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    caption,
    judge_colours,
    render,
    sample_scene,
)


def test_render_is_deterministic_and_returns_a_mask():
    scene = sample_scene(np.random.default_rng(7))
    image_a, mask_a = render(scene)
    image_b, mask_b = render(scene)
    assert image_a.shape == (64, 64, 3) and image_a.dtype == np.uint8
    assert mask_a.shape == (64, 64) and mask_a.dtype == bool
    assert np.array_equal(image_a, image_b) and np.array_equal(mask_a, mask_b)
    assert 0.03 < mask_a.mean() < 0.5  # one object, neither a dot nor the whole image


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_differ_in_area_as_geometry_says(shape):
    # At equal radius a circle covers pi r^2, a bar (2.5 : 1) 2 r^2 sin(2 atan(1 / 2.5)), a five-pointed star (inner radius 0.45 r) and a triangle less.
    rng = np.random.default_rng(0)
    scene = sample_scene(rng, shape=shape)
    area = render(scene)[1].mean() / (scene.radius**2)
    expected = {"circle": np.pi, "bar": 2 * np.sin(2 * np.arctan(1 / 2.5)), "triangle": 3 * np.sqrt(3) / 4, "star": 10 * 0.5 * 0.45 * np.sin(np.pi / 5)}[shape]
    assert area == pytest.approx(expected, rel=0.15)


def test_attributes_can_be_fixed_and_caption_names_them():
    scene = sample_scene(np.random.default_rng(1), shape="star", colour="blue", background="snow")
    assert (scene.shape, scene.colour, scene.background) == ("star", "blue", "snow")
    assert caption(scene) == "a photograph of a blue star on snow"
    assert caption(scene, colour=False) == "a photograph of a star on snow"


def test_judge_reads_back_colour_and_background_with_and_without_mask():
    rng = np.random.default_rng(3)
    for colour in COLOURS:
        for background in BACKGROUNDS:
            scene = sample_scene(rng, colour=colour, background=background)
            image, mask = render(scene)
            for judged in (judge_colours(image), judge_colours(image, mask)):
                assert (judged.colour, judged.background) == (colour, background)


def test_judge_reports_no_object_on_a_bare_background():
    image, mask = render(sample_scene(np.random.default_rng(4), background="sand"))
    bare = image.copy()
    bare[mask] = image[~mask][: mask.sum()]
    judged = judge_colours(bare)
    assert judged.colour is None and judged.background == "sand"
