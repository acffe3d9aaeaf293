"""The shipped Shapes judge reads renders correctly, and `distilsd shapes eval` scores a model."""

import json

import numpy as np
import pytest

from distilsd.cli import main
from distilsd.shapes import parse_caption, render, scene_for_index
from distilsd.shapes.judge import evaluate_judge, frechet_distance, is_aligned, load_judge, read_images


@pytest.fixture(scope="module")
def judge():
    return load_judge()


def test_judge_accuracy_on_heldout_renders(judge):
    report = evaluate_judge(judge, count=400)
    assert report.heldout_scene_accuracy >= 0.98, report
    assert report.heldout_caption_alignment >= 0.98, report


def test_judge_rejects_wrong_prompts(judge):
    scenes = [scene_for_index(99, i, two_object_fraction=0.0) for i in range(50)]
    readings = read_images(judge, [render(s) for s in scenes])
    wrong = 0
    for scene, reading in zip(scenes, readings):
        obj = scene.objects[0]
        other_color = "blue" if obj.color != "blue" else "red"
        wrong += is_aligned(reading, parse_caption(f"a {other_color} {obj.shape}"))
    assert wrong == 0


def test_shapes_fid_separates_renders_from_noise(judge):
    renders = [render(scene_for_index(5, i)) for i in range(120)]
    more = [render(scene_for_index(6, i)) for i in range(120)]
    from PIL import Image

    noise = [
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        for i in range(120)
    ]
    features = {
        name: np.stack([r.features for r in read_images(judge, images)])
        for name, images in [("a", renders), ("b", more), ("noise", noise)]
    }
    same = frechet_distance(features["a"], features["b"])
    different = frechet_distance(features["a"], features["noise"])
    assert different > 10 * max(same, 1e-3)


@pytest.mark.slow
def test_shapes_eval_cli_on_a_tiny_model(tiny_pipeline_dir, tmp_path, capsys):
    main(
        [
            "shapes",
            "eval",
            "-m",
            str(tiny_pipeline_dir),
            "-o",
            str(tmp_path),
            "--prompts-per-group",
            "4",
            "--steps",
            "2",
            "-q",
        ]
    )
    out = capsys.readouterr().out
    assert "| model | align (1 obj) | align (2 obj) | Shapes-FID | s / image |" in out
    results = json.loads((tmp_path / "shapes_eval.json").read_text())
    assert results[0]["prompts_per_group"] == 4
    assert results[0]["alignment_single"] <= 0.5  # random weights draw no shapes
    assert results[0]["shapes_fid"] > 0
    assert len(list(tmp_path.rglob("*.png"))) == 8


def test_shapes_eval_compares_models_with_the_first(tiny_pipeline_dir, tmp_path, capsys):
    """Several models: each one's Shapes-FID and PSNR against the first (same prompts, seeds)."""
    from distilsd.testing import save_tiny_pipeline

    same = f"{tiny_pipeline_dir}::{tiny_pipeline_dir / 'unet'}"  # the same weights, another name
    other = save_tiny_pipeline(tmp_path / "other-seed", seed=1)
    main(
        [
            "shapes",
            "eval",
            "-m",
            str(tiny_pipeline_dir),
            "-m",
            same,
            "-m",
            str(other),
            "-o",
            str(tmp_path / "eval"),
        ]
        + ["--prompts-per-group", "3", "--steps", "2", "-q"]
    )
    assert "Shapes-FID vs first | PSNR vs first (dB) |" in capsys.readouterr().out
    first, twin, other = json.loads((tmp_path / "eval" / "shapes_eval.json").read_text())
    assert first["psnr_vs_first"] is None and first["shapes_fid_vs_first"] is None
    assert twin["psnr_vs_first"] == "inf" and twin["shapes_fid_vs_first"] == pytest.approx(0.0, abs=1e-3)
    assert other["psnr_vs_first"] < 40 and other["shapes_fid_vs_first"] > 0
