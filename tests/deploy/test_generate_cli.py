"""`distilsd generate` on exported folders and with --backend: same CLI, same PNG metadata."""

from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image

from distilsd.generate import read_png_parameters


def test_generate_runs_an_exported_folder(openvino_export, tiny_pipeline_dir, tmp_path, run_cli):
    args = ["generate", "a red circle", "--steps", "3", "--seed", "2", "--json", "-q"]
    code, out, err = run_cli(args + ["--model", str(openvino_export), "-o", str(tmp_path / "ov")])
    assert code == 0, err
    exported = json.loads(out)["images"][0]
    assert exported["model"].endswith("@openvino-fp32") and (exported["width"], exported["height"]) == (64, 64)
    assert "Steps: 3, Sampler: PLMS" in read_png_parameters(exported["path"])
    code, out, err = run_cli(args + ["--model", str(tiny_pipeline_dir), "-o", str(tmp_path / "pt")])
    reference = json.loads(out)["images"][0]
    a = np.asarray(Image.open(exported["path"]), dtype=np.float64) / 255
    b = np.asarray(Image.open(reference["path"]), dtype=np.float64) / 255
    assert 10 * np.log10(1 / max(np.mean((a - b) ** 2), 1e-12)) >= 35


def test_exported_folder_bad_inputs(openvino_export, tmp_path, expect_cli_error):
    out = ["-o", str(tmp_path / "o"), "--steps", "1"]
    expect_cli_error(
        ["generate", "x", "--model", str(openvino_export), "-W", "128", "-H", "128"] + out,
        "exported with static shapes for 64x64",
    )
    partial = tmp_path / "partial"
    shutil.copytree(openvino_export, partial)
    (partial / "distilsd-export.json").unlink()
    expect_cli_error(["generate", "x", "--model", str(partial)] + out, "did not finish")


def test_backend_flag_exports_once_then_reuses(tiny_pipeline_dir, onnx_cached_export, tmp_path, run_cli):
    # onnx_cached_export already put this model's ONNX export in the session's cache.
    before = onnx_cached_export.stat().st_mtime
    code, out, err = run_cli(
        [
            "generate",
            "x",
            "--model",
            str(tiny_pipeline_dir),
            "--backend",
            "onnx",
            "--steps",
            "2",
            "-o",
            str(tmp_path),
            "--json",
            "-q",
        ]
    )
    assert code == 0, err
    assert json.loads(out)["images"][0]["model"].endswith("@onnx-fp32")
    assert onnx_cached_export.stat().st_mtime == before  # reused, not exported again


def test_export_with_a_swapped_in_unet_folder(tiny_pipeline_dir, tmp_path, run_cli):
    """`export --unet DIR`: the swapped U-Net's config holds a path, which the export writes as text."""
    unet = tmp_path / "student-unet"
    shutil.copytree(tiny_pipeline_dir / "unet", unet)
    out = tmp_path / "ov"
    code, _, err = run_cli(["export", "-m", str(tiny_pipeline_dir), "--unet", str(unet), "-o", str(out),
                            "--no-vae-encoder"])  # fmt: skip
    assert code == 0, err
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["sample_size"] == json.loads((unet / "config.json").read_text())["sample_size"]
    code, _, err = run_cli(
        ["generate", "x", "--model", str(out), "--steps", "1", "-o", str(tmp_path / "img"), "-q"]
    )
    assert code == 0, err


def test_export_follows_the_tokenizers_length(tiny_pipeline_dir, tmp_path, run_cli):
    """A model whose tokenizer pads to 24 tokens (the Shapes model) exports 24-token inputs."""
    model = tmp_path / "short-captions"
    shutil.copytree(tiny_pipeline_dir, model)
    config_file = model / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["model_max_length"] = 24
    config_file.write_text(json.dumps(config))
    out = tmp_path / "ov"
    code, _, err = run_cli(["export", "-m", str(model), "-o", str(out), "--no-vae-encoder"])
    assert code == 0, err
    manifest = json.loads((out / "distilsd-export.json").read_text())
    assert manifest["shapes"]["text_tokens"] == 24
    code, _, err = run_cli(
        ["generate", "x", "--model", str(out), "--steps", "1", "-o", str(tmp_path / "img"), "-q"]
    )
    assert code == 0, err


def test_an_export_samples_with_its_source_models_default_guidance(openvino_export, tmp_path, run_cli):
    """An export of a Shapes model keeps the 4.5 the Shapes models sample with (7.5 oversaturates
    them); an export of any other model keeps SD's 7.5."""
    from distilsd.models import default_guidance

    shapes_like = tmp_path / "shapes-export"
    shutil.copytree(openvino_export, shapes_like)
    manifest_path = shapes_like / "distilsd-export.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["source"]["model"] = "shapes-tiny"  # as `distilsd export -m shapes-tiny` writes it
    manifest_path.write_text(json.dumps(manifest))
    assert default_guidance(str(shapes_like)) == 4.5
    assert default_guidance(str(openvino_export)) == 7.5
    assert default_guidance(f"shapes::{openvino_export}") == 4.5  # BASE::UNET samples like BASE
    for model, cfg in [(shapes_like, "CFG scale: 4.5"), (openvino_export, "CFG scale: 7.5")]:
        out = tmp_path / f"images-{model.name}"
        code, stdout, err = run_cli(
            ["generate", "a red circle", "--model", str(model), "--steps", "1", "--json", "-q", "-o", str(out)]
        )
        assert code == 0, err
        assert cfg in read_png_parameters(json.loads(stdout)["images"][0]["path"])
