"""scripts/compare_tiny_decoders.py pairs two tiny decoders and the full VAE on the same latents."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distilsd.models import builtin_folder

SCRIPT = Path(__file__).parents[1] / "scripts" / "compare_tiny_decoders.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_a_broken_decoder_is_paired_against_the_shipped_one(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(builtin_folder("shapes") / "tiny_vae", broken)
    weights = broken / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    last = max(int(name.split(".")[2]) for name in state if name.startswith("decoder.layers."))
    state = {name: torch.zeros_like(value) if name.startswith(f"decoder.layers.{last}.") else value
             for name, value in state.items()}  # fmt: skip
    save_file(state, weights)  # the last decoder layer zeroed: every image one flat grey

    run = _run("--a", "tiny", "--b", str(broken), "--prompts-per-group", "6")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    for key in ("judge_single", "judge_two", "classic_single"):
        row = report[key]
        assert row["b"]["value"] == 0.0  # nothing on a flat image is aligned
        assert row["a_minus_b"]["value"] == row["a"]["value"] > 0.5
        assert abs(row["a_minus_vae"]["value"] - (row["a"]["value"] - row["vae"]["value"])) < 1e-9
    assert report["levels_from"]["vae"]["vae"] == 0.0
    assert (
        report["vae_round_trip_of_32px_crops_from_its_whole_image_round_trip"] > 1.0
    )  # why crops come after the VAE
    assert report["levels_from"]["a"]["vae"] < 5 < report["levels_from"]["b"]["vae"]


def test_a_folder_that_is_not_a_tiny_vae_is_refused_in_one_line(tmp_path):
    run = _run("--a", str(tmp_path), "--b", "tiny", "--prompts-per-group", "2")
    assert run.returncode == 2
    assert "not a tiny VAE folder" in run.stderr and "Traceback" not in run.stderr
