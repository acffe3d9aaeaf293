"""data.refine_latents (`dreambooth --refine-latents N`): the latents a U-Net learns are moved
until the VAE's decoder draws the training image, for the instance rows only, the same in the
cached and the uncached path."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from distilsd.distill import load_config, run_training
from distilsd.errors import InputError

from .conftest import listing_marked, lora_overrides


def _hexagon_pixels(count: int):
    import numpy as np

    from distilsd.shapes.personalise import subject_scenes
    from distilsd.shapes.world import render

    renders = [
        np.asarray(render(scene).convert("RGB"), dtype=np.float32) for scene in subject_scenes(count, seed=7)
    ]
    return torch.from_numpy(np.stack(renders) / 127.5 - 1.0).permute(0, 3, 1, 2)


def test_refined_latents_decode_to_the_shapes_hexagons_and_do_not_depend_on_the_batch():
    """The Shapes VAE never saw a hexagon: its encoder's mean decodes to a rounded one. The
    refined latent decodes much closer to the render, and an image's refinement is the same
    alone as in a batch (the cached and uncached paths batch differently)."""
    from diffusers import AutoencoderKL

    from distilsd.distill.cache import encode_images, refine_latent_means
    from distilsd.models import builtin_folder

    vae = AutoencoderKL.from_pretrained(str(builtin_folder("shapes")), subfolder="vae").eval()
    pixels = _hexagon_pixels(4)
    mean, _ = encode_images(vae, pixels)
    refined = refine_latent_means(vae, pixels, mean, 40)
    with torch.no_grad():
        before = (vae.decode(mean).sample - pixels).abs().mean(dim=(1, 2, 3))
        after = (vae.decode(refined).sample - pixels).abs().mean(dim=(1, 2, 3))
    assert bool((after < 0.9 * before).all()) and float(after.mean()) < 0.75 * float(before.mean()), (
        before,
        after,
    )
    assert all(p.grad is None for p in vae.parameters()), "the VAE is left as it was"
    alone = refine_latent_means(vae, pixels[1:2], mean[1:2], 40)
    assert torch.equal(alone[0], refined[1])


def _losses(run):
    with open(run / "logs" / "train.csv") as f:
        return [float(row["task"]) for row in csv.DictReader(f)]


def test_cached_and_uncached_runs_learn_the_same_refined_latents_of_the_instance_rows_only(
    tiny_pipeline_dir, lora_data_dir, tmp_path
):
    from safetensors.torch import load_file

    data, _ = listing_marked(lora_data_dir, tmp_path / "data", range(4, 8))
    cache_dir = tmp_path / "cache"
    losses = {}
    for name, cached, steps in (("uncached", False, 5), ("cached", True, 5), ("plain", True, 0)):
        run = tmp_path / name
        overrides = lora_overrides(
            tiny_pipeline_dir, data, run, max_steps=2, log_every=1,
            **{"data.refine_latents": steps, "data.cache_latents": cached, "data.cache_dir": str(cache_dir)},
        )  # fmt: skip
        run_training(load_config(overrides=overrides))
        losses[name] = _losses(run)
    assert losses["cached"] == pytest.approx(losses["uncached"], rel=1e-4)
    assert losses["plain"] != pytest.approx(losses["cached"], rel=1e-4), (
        "the refinement changes what is learnt"
    )

    # Two caches (refined and not, different keys); they differ on the instance rows only.
    shards = {}
    for folder in cache_dir.iterdir():
        manifest = json.loads((folder / "manifest.json").read_text())
        shards[len(shards)] = load_file(str(folder / manifest["shards"][0]["file"]))
    assert len(shards) == 2
    first, second = shards[0], shards[1]
    order = first["index"].tolist()
    assert order == second["index"].tolist() == list(range(8))
    for key in ("latent_mean", "latent_mean_flip"):
        assert torch.equal(first[key][4:], second[key][4:]), "prior rows stay as the encoder made them"
        assert not torch.allclose(first[key][:4], second[key][:4])
    assert torch.equal(first["latent_std"], second["latent_std"])


def test_bad_refine_settings_are_refused(tiny_pipeline_dir, lora_data_dir, tmp_path, expect_cli_error):
    with pytest.raises(InputError, match="data.refine_latents must be 0 or more"):
        load_config(
            overrides=lora_overrides(
                tiny_pipeline_dir, lora_data_dir, tmp_path / "a", **{"data.refine_latents": -1}
            )
        )
    with pytest.raises(InputError, match="it is for component: unet"):
        load_config(overrides={"model": str(tiny_pipeline_dir), "component": "vae", "data.refine_latents": 3})
    expect_cli_error(
        ["dreambooth", "-m", str(tiny_pipeline_dir), "--instance-data", str(lora_data_dir), "--instance-prompt",
         "a circle", "--refine-latents", "-1", "-o", str(tmp_path / "b")],
        "--refine-latents",
    )  # fmt: skip
    assert not (tmp_path / "b").exists()
