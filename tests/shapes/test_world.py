import json

import numpy as np
import pytest

from distilsd.cli import main
from distilsd.shapes import HELD_OUT_SHAPES, SHAPES, parse_caption, render, scene_for_index


def test_renderer_is_deterministic():
    for index in range(20):
        a, b = scene_for_index(7, index), scene_for_index(7, index)
        assert a == b
        assert np.array_equal(np.asarray(render(a)), np.asarray(render(b)))
    assert scene_for_index(7, 0) != scene_for_index(8, 0)


def test_scenes_cover_the_world_and_hold_out_hexagon():
    scenes = [scene_for_index(0, i) for i in range(2000)]
    shapes = {o.shape for s in scenes for o in s.objects}
    assert shapes == set(SHAPES) - set(HELD_OUT_SHAPES)
    assert {len(s.objects) for s in scenes} == {1, 2}
    with_hexagon = [scene_for_index(0, i, shapes=SHAPES) for i in range(500)]
    assert any(o.shape == "hexagon" for s in with_hexagon for o in s.objects)


def test_two_object_scenes_respect_their_relation():
    for index in range(500):
        scene = scene_for_index(3, index, two_object_fraction=1.0)
        a, b = scene.objects
        assert np.hypot(a.x - b.x, a.y - b.y) > a.radius + b.radius  # no overlap
        if scene.relation == "left of":
            assert a.x < b.x
        elif scene.relation == "above":
            assert a.y < b.y


def test_captions_parse_back_to_their_scene():
    for index in range(1000):
        scene = scene_for_index(11, index)
        target = parse_caption(scene.caption)
        assert target.objects == tuple((o.color, o.shape) for o in scene.objects)
        if len(scene.objects) == 1:
            assert target.position == scene.objects[0].position
        else:
            assert target.relation == scene.relation
    assert parse_caption("a photo of a cat") is None
    assert parse_caption("A Red Circle").objects == (("red", "circle"),)


def test_render_draws_the_object_in_its_color_and_place():
    scene = scene_for_index(0, 0)
    scene.objects = scene.objects[:1]
    obj = scene.objects[0]
    pixels = np.asarray(render(scene, 64)).astype(int)
    from distilsd.shapes.world import COLORS

    y, x = int(obj.y * 64), int(obj.x * 64)
    assert np.abs(pixels[y, x] - COLORS[obj.color]).max() < 40


def test_make_data_cli(tmp_path, capsys):
    out = tmp_path / "data"
    main(["shapes", "make-data", "-o", str(out), "--count", "12", "--seed", "5", "-q"])
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 12
    assert all((out / line["file_name"]).exists() and line["text"] for line in lines)
    assert lines[3]["text"] == scene_for_index(5, 3).caption
    with pytest.raises(SystemExit) as exc:
        main(["shapes", "make-data", "-o", str(out), "--count", "2"])
    assert exc.value.code != 0
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["shapes", "make-data", "-o", str(tmp_path / "x"), "--count", "0"])
    assert "--count 0 must be >= 1" in capsys.readouterr().err


def test_loose_styles_draw_the_same_object_differently():
    """ShapeStyle: the default is the canonical render; a sparkle cross, a rounded square and a turned one differ from it."""
    from distilsd.shapes.world import Scene, ShapeObject, ShapeStyle

    def pixels(shape, style=None):
        scene = Scene([ShapeObject(shape, "red", "large", 0.5, 0.5, 0.22)], "white")
        return np.asarray(render(scene, styles=None if style is None else [style]), dtype=np.float32)

    assert np.array_equal(pixels("cross"), pixels("cross", ShapeStyle()))
    red = lambda image: (np.abs(image - [220, 30, 30]).sum(-1) < 60).sum()  # noqa: E731
    # A sparkle is far thinner than a plus of the same radius; rounding shaves the square's corners.
    assert red(pixels("cross", ShapeStyle(sparkle=0.3))) < 0.7 * red(pixels("cross"))
    assert red(pixels("square", ShapeStyle(rounding=0.2))) < red(pixels("square"))
    corner = pixels("square", ShapeStyle(rounding=0.2))[21, 21]  # the canonical square's corner pixel
    assert np.abs(corner - [245, 245, 245]).sum() < np.abs(pixels("square")[21, 21] - [245, 245, 245]).sum()
    assert not np.array_equal(pixels("star", ShapeStyle(rotation=0.15)), pixels("star"))
