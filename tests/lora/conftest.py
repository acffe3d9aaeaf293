"""Fixtures for the LoRA tests: data, and a U-Net LoRA trained once on the tiny pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def lora_data_dir(tmp_path_factory) -> Path:
    from distilsd.distill.samples import write_shapes_folder

    return write_shapes_folder(tmp_path_factory.mktemp("lora-data") / "data", num_images=8, size=64)


def listing_marked(data, folder, prior_rows):
    """A copy of the image folder ``data`` whose metadata rows in ``prior_rows`` say "prior": true."""
    shutil.copytree(data, folder)
    listing = folder / "metadata.jsonl"
    rows = [json.loads(line) for line in listing.read_text().splitlines() if line.strip()]
    for i in prior_rows:
        rows[i]["prior"] = True
    listing.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder, len(rows)


def lora_overrides(model: Path, data: Path, output: Path, **extra) -> dict:
    values = {
        "model": str(model),
        "output_dir": str(output),
        "data.source": str(data),
        "data.resolution": 64,
        "train_batch_size": 2,
        "max_steps": 4,
        "optim.learning_rate": 2e-2,  # large, so that 4 steps move the images visibly
        "checkpoint_every": 0,
        "validation.prompts": [],
        "progress_bar": False,
        "log_with": ["csv"],
        "loss.l_out": 0.0,
        "loss.l_feat": 0.0,
        "lora.rank": 4,
        "lora.alpha": 8,
    }
    values.update(extra)
    return values


@pytest.fixture(scope="session")
def unet_lora_run(tiny_pipeline_dir, lora_data_dir, tmp_path_factory) -> Path:
    """A run folder with a rank-4 (alpha 8) U-Net LoRA in both layouts."""
    from distilsd.distill import load_config, run_training

    run = tmp_path_factory.mktemp("lora-run") / "run"
    run_training(
        load_config(overrides=lora_overrides(tiny_pipeline_dir, lora_data_dir, run, **{"lora.kohya": True}))
    )
    return run


def generate_image(run_cli, out: Path, model, prompt: str, *extra) -> np.ndarray:
    """`distilsd generate PROMPT` (3 steps, seed 5, guidance 5) into ``out``; its one image as int16 pixels."""
    code, _, err = run_cli(
        ["generate", prompt, "--model", str(model), "-o", str(out), "--steps", "3", "--seed", "5",
         "--guidance", "5", "-q", *extra]
    )  # fmt: skip
    assert code == 0, err
    (png,) = out.glob("*.png")
    return np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
