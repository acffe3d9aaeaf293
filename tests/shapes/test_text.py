"""`distilsd shapes train-text`: CLIP-style pretraining of the Shapes text encoder."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from distilsd.shapes.data import make_data

    return make_data(tmp_path_factory.mktemp("text") / "data", count=48, progress=False)


def test_train_text_learns_the_pairs_and_changes_only_the_text_encoder(
    tiny_pipeline_dir, pairs, tmp_path, run_cli
):
    from diffusers import StableDiffusionPipeline

    output = tmp_path / "pretrained"
    code, out, err = run_cli(
        [
            "shapes",
            "train-text",
            "-m",
            str(tiny_pipeline_dir),
            "--data",
            str(pairs),
            "-o",
            str(output),
            "--steps",
            "40",
            "--batch-size",
            "16",
            "--heldout",
            "8",
            "-q",
        ]  # fmt: skip
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["train_pairs"] == 40 and report["heldout_pairs"] == 8
    # 40 pairs seen 16 at a time for 40 steps: the contrastive loss falls from chance, ln(16).
    assert report["first_loss"] > 2.5
    assert report["final_loss"] < report["first_loss"] - 0.5
    assert json.loads((output / "text_pretraining.json").read_text()) == report

    def weights(folder, part, name):
        return load_file(str(folder / part / name))

    before = weights(tiny_pipeline_dir, "text_encoder", "model.safetensors")
    after = weights(output, "text_encoder", "model.safetensors")
    assert any(not (after[k] == before[k]).all() for k in before)
    for part in ("unet", "vae"):
        name = "diffusion_pytorch_model.safetensors"
        old, new = weights(tiny_pipeline_dir, part, name), weights(output, part, name)
        assert all((new[k] == old[k]).all() for k in old), part
    pipe = StableDiffusionPipeline.from_pretrained(output, safety_checker=None)
    assert (
        pipe.tokenizer.model_max_length
        == StableDiffusionPipeline.from_pretrained(
            tiny_pipeline_dir, safety_checker=None
        ).tokenizer.model_max_length
    )


def test_train_text_refuses_too_little_data_and_an_existing_folder(
    tiny_pipeline_dir, pairs, tmp_path, expect_cli_error
):
    args = ["shapes", "train-text", "-m", str(tiny_pipeline_dir), "--data", str(pairs), "--steps", "1"]
    expect_cli_error(
        [*args, "-o", str(tmp_path / "a"), "--heldout", "24"], "48 image-caption pairs", "holds out 24"
    )
    (tmp_path / "b").mkdir()
    expect_cli_error([*args, "-o", str(tmp_path / "b"), "--heldout", "8"], "already exists", "--overwrite")
    expect_cli_error([*args, "-o", str(tmp_path / "c"), "--heldout", "8", "--steps", "0"], "steps must be")
    expect_cli_error([*args, "-o", str(tmp_path / "d"), "--heldout", "0"], "heldout at least 1")
    expect_cli_error([*args[:5], str(tmp_path / "missing"), "-o", str(tmp_path / "e")], "not found")
