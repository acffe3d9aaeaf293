"""LoRA training on the existing trainer: only adapters train, the files load, resume is exact."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from distilsd.distill import load_config, run_training
from distilsd.errors import InputError

from .conftest import listing_marked, lora_overrides


def test_lora_run_writes_adapters_only_and_leaves_the_base_weights(tiny_pipeline_dir, unet_lora_run):
    from distilsd.distill.checkpoint import load_unet_weights

    lora = load_file(str(unet_lora_run / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("unet.") and ".lora." in k for k in lora)
    ups = [v for k, v in lora.items() if k.endswith("lora.up.weight")]
    assert any(float(v.abs().max()) > 0 for v in ups), "the up projections start at 0 and must have trained"
    kohya = load_file(str(unet_lora_run / "lora_kohya.safetensors"))
    assert len(kohya) == len(lora) // 2 * 3  # down, up and alpha per module
    assert all(float(v) == 8.0 for k, v in kohya.items() if k.endswith(".alpha"))
    info = json.loads((unet_lora_run / "lora_info.json").read_text())
    assert info["rank"] == 4 and info["alpha"] == 8 and info["steps"] == 4 and info["weights"] == "raw"
    assert not (unet_lora_run / "unet").exists(), "a LoRA run writes no pipeline"
    # The frozen base weights in the last checkpoint are the model's own.
    base = load_unet_weights(tiny_pipeline_dir / "unet")
    trained = load_unet_weights(unet_lora_run / "checkpoints" / "checkpoint-4" / "unet")
    for name, tensor in base.items():
        key = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(trained.get(name, trained.get(key)), tensor), name


def test_ema_is_off_for_adapters_unless_asked(tiny_pipeline_dir, lora_data_dir, tmp_path):
    overrides = lora_overrides(tiny_pipeline_dir, lora_data_dir, tmp_path)
    assert load_config(overrides=overrides).optim.ema is False
    assert load_config(overrides={**overrides, "optim.ema": True}).optim.ema is True
    assert load_config(overrides={"model": "x"}).optim.ema is True


@pytest.mark.slow
def test_text_encoder_lora_resumes_exactly(tiny_pipeline_dir, lora_data_dir, tmp_path):
    extra = {"lora.text_encoder": True, "checkpoint_every": 2, "max_steps": 4, "optim.lr_scheduler": "cosine"}
    reference = tmp_path / "reference"
    run_training(load_config(overrides=lora_overrides(tiny_pipeline_dir, lora_data_dir, reference, **extra)))
    # An interrupted run: the copy of the reference as it was after step 2.
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-4")
    for name in ("pytorch_lora_weights.safetensors", "lora_info.json"):
        (resumed / name).unlink()
    run_training(
        load_config(
            overrides=lora_overrides(tiny_pipeline_dir, lora_data_dir, resumed, resume="latest", **extra)
        )
    )
    want = load_file(str(reference / "pytorch_lora_weights.safetensors"))
    got = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("text_encoder.") for k in want)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7, msg=key)


def test_bad_lora_settings_are_refused(tiny_pipeline_dir, lora_data_dir, tmp_path, expect_cli_error):
    with pytest.raises(InputError, match="lora.rank must be at least 1"):
        load_config(
            overrides=lora_overrides(tiny_pipeline_dir, lora_data_dir, tmp_path / "a", **{"lora.rank": 0})
        )
    common = ["train", "--model", str(tiny_pipeline_dir), "--data", str(lora_data_dir), "--resolution", "64",
              "--max-steps", "1", "--no-progress", "validation.prompts=[]"]  # fmt: skip
    # The tiny U-Net's attention projections are 32 wide (16 in the first level).
    expect_cli_error(
        [*common, "-o", str(tmp_path / "b"), "--lora-rank", "64"],
        "LoRA rank 64 is larger than the layer",
        "to_",
    )
    expect_cli_error(
        [*common, "-o", str(tmp_path / "c"), "--lora-rank", "2", "--lora-targets", "nothing_here"],
        "no module of the U-Net matches",
    )
    expect_cli_error(
        [*common, "-o", str(tmp_path / "d"), "--lora-rank", "2", "--train-text-encoder"],
        "--train-text-encoder-lora",
    )
    assert not (tmp_path / "b" / "pytorch_lora_weights.safetensors").exists()


def _task_losses(run):
    import csv

    with open(run / "logs" / "train.csv") as f:
        return [float(row["task"]) for row in csv.DictReader(f)]


def test_prior_rows_with_the_base_target_cost_what_the_adapters_change(
    tiny_pipeline_dir, lora_data_dir, tmp_path
):
    """loss.prior_target base: a prior row's target is the U-Net's prediction with its adapters off.
    The adapters start at zero (peft's up-projection), so on prior rows only the loss is exactly 0
    and stays 0: nothing moves them. With the noise target the same rows cost the usual loss."""
    everything, n = listing_marked(lora_data_dir, tmp_path / "all-prior", range(8))
    settings = {"max_steps": 3, "log_every": 1, "lora.rank": 2}
    base_run, noise_run = tmp_path / "base", tmp_path / "noise"
    run_training(
        load_config(
            overrides=lora_overrides(
                tiny_pipeline_dir, everything, base_run, **settings, **{"loss.prior_target": "base"}
            )
        )
    )
    run_training(load_config(overrides=lora_overrides(tiny_pipeline_dir, everything, noise_run, **settings)))
    assert n == 8 and _task_losses(base_run) == [0.0, 0.0, 0.0]
    assert all(loss > 1e-3 for loss in _task_losses(noise_run))
    # Half the rows marked: the unmarked ones pull the adapters, so the loss is no longer 0.
    half, _ = listing_marked(lora_data_dir, tmp_path / "half-prior", range(0, 8, 2))
    half_run = tmp_path / "half"
    run_training(
        load_config(
            overrides=lora_overrides(
                tiny_pipeline_dir, half, half_run, **settings, **{"loss.prior_target": "base"}
            )
        )
    )
    assert all(loss > 0 for loss in _task_losses(half_run))


def test_the_base_prior_target_on_data_without_prior_rows_says_so(
    tiny_pipeline_dir, lora_data_dir, tmp_path, caplog
):
    """No row marked "prior": the option would change nothing, and the run says why."""
    overrides = lora_overrides(
        tiny_pipeline_dir, lora_data_dir, tmp_path / "a", max_steps=1, **{"lora.rank": 2, "loss.prior_target": "base"}
    )
    with caplog.at_level(logging.WARNING, logger="distilsd.distill.trainer"):
        run_training(load_config(overrides=overrides))
    assert any('no row of' in r.message and '"prior": true' in r.message for r in caplog.records)


def test_the_base_prior_target_needs_lora_adapters(tiny_pipeline_dir, lora_data_dir, tmp_path):
    overrides = lora_overrides(
        tiny_pipeline_dir, lora_data_dir, tmp_path / "a", **{"loss.prior_target": "base"}
    )
    for extra, message in [
        ({"lora.rank": None}, "it needs lora.rank"),
        ({"lora.text_encoder": True}, "train without lora.text_encoder"),
        ({"data.cache_latents": True}, "set data.cache_latents false"),
    ]:
        with pytest.raises(InputError, match=message):
            load_config(overrides={**overrides, **extra})
