"""The classical reader (colour segmentation + shape templates) that labels generated images with the judge."""

import pytest

from distilsd.shapes import render, scene_for_index
from distilsd.shapes.classic import read_classic
from distilsd.shapes.world import SHAPES, Scene, ShapeObject


@pytest.mark.slow
def test_classic_reader_reads_renders():
    scenes = [scene_for_index(7, i, shapes=SHAPES) for i in range(60)]
    right = 0
    for scene in scenes:
        found = read_classic(render(scene))
        right += sorted(o.pair for o in found) == sorted((o.color, o.shape) for o in scene.objects)
    assert right >= 58


def test_classic_reader_counts_repeats_and_finds_centres():
    twins = Scene(
        [
            ShapeObject("heart", "red", "small", 0.3, 0.3, 0.12),
            ShapeObject("heart", "red", "large", 0.7, 0.65, 0.2),
        ],
        "gray",
    )
    found = read_classic(render(twins))
    assert [o.pair for o in found] == [("red", "heart"), ("red", "heart")]
    assert abs(found[0].x - 0.7) < 0.03 and abs(found[0].y - 0.65) < 0.03
