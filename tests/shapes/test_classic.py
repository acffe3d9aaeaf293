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


def test_reread_script_scores_an_eval_folder_and_pairs_models(tmp_path):
    """scripts/reread_with_classic.py on two `shapes eval`-style folders of renders: the reader
    aligns the renders of the captions, a blank image is a miss, and the paired difference is
    the per-prompt mean."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    scenes = [scene_for_index(11, i, shapes=SHAPES) for i in range(8)]  # both groups hold 2+
    for model, blank in (("good", set()), ("worse", {0, 1})):
        folder = tmp_path / model
        folder.mkdir()
        rows = []
        for i, scene in enumerate(scenes):
            name = f"{len(scene.objects)}obj-{i:04d}.png"
            image = Image.new("RGB", (64, 64), (128, 128, 128)) if i in blank else render(scene)
            image.save(folder / name)
            rows.append({"file": name, "prompt": scene.caption, "objects_asked": len(scene.objects),
                         "aligned": {"exact": i not in blank}})  # fmt: skip
        (folder / "judged.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = Path(__file__).parents[2] / "scripts" / "reread_with_classic.py"
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "good", "worse"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ones = sum(len(s.objects) == 1 for s in scenes)  # 4 of the 8; images 0 and 1 are among them
    lines = {line.split(":")[0]: line for line in out.splitlines()}
    assert "reader 1.000" in lines["good 1 obj"] and "judge 1.000" in lines["good 1 obj"]
    assert "reader 0.500" in lines["worse 1 obj"] and ones == 4
    assert "reader good - worse, 1 obj: 0.500" in out and "judge good - worse, 1 obj: 0.500" in out
