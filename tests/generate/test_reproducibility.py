"""distilsd generate gives diffusers' own images, bit for bit, and the same bytes twice."""

import numpy as np
import pytest
import torch
from PIL import Image

from distilsd.generate import SCHEDULERS, generate, make_scheduler


def diffusers_image(pipeline_dir, prompt, seed, scheduler, steps=3, guidance=7.5, negative=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(
        prompt,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
    )
    return np.asarray(out.images[0])


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "dpm++", "euler-a", "dpm++-sde", "heun", "unipc"])
def test_same_image_as_plain_diffusers(tiny_pipeline_dir, tmp_path, scheduler):
    records = generate(
        ["a red circle"], model=str(tiny_pipeline_dir), output_dir=tmp_path, scheduler=scheduler,
        num_inference_steps=3, seed=42, negative_prompt="blurry", progress=False,
    )  # fmt: skip
    ours = np.asarray(Image.open(records[0].path).convert("RGB"))
    theirs = diffusers_image(tiny_pipeline_dir, "a red circle", 42, scheduler, negative="blurry")
    assert ours.shape == (64, 64, 3)
    np.testing.assert_array_equal(ours, theirs)


def test_every_scheduler_runs(tiny_pipeline_dir, tmp_path):
    for name in SCHEDULERS:
        records = generate(
            ["x"],
            model=str(tiny_pipeline_dir),
            output_dir=tmp_path / name,
            scheduler=name,
            num_inference_steps=2,
            progress=False,
        )
        assert records[0].scheduler == name
        assert Image.open(records[0].path).size == (64, 64)


def test_same_bytes_twice(tiny_pipeline_dir, tmp_path):
    first = generate(
        ["a blue square"],
        model=str(tiny_pipeline_dir),
        output_dir=tmp_path / "a",
        num_inference_steps=2,
        seed=7,
        progress=False,
    )
    second = generate(
        ["a blue square"],
        model=str(tiny_pipeline_dir),
        output_dir=tmp_path / "b",
        num_inference_steps=2,
        seed=7,
        progress=False,
    )
    assert open(first[0].path, "rb").read() == open(second[0].path, "rb").read()


def test_seeds_and_batching(tiny_pipeline_dir, tmp_path):
    # Image k uses seed + k whatever the batch size, so batching does not change the images.
    one_by_one = generate(
        ["a star"],
        model=str(tiny_pipeline_dir),
        output_dir=tmp_path / "b1",
        num_inference_steps=2,
        seed=5,
        num_images_per_prompt=3,
        batch_size=1,
        progress=False,
    )
    batched = generate(
        ["a star"],
        model=str(tiny_pipeline_dir),
        output_dir=tmp_path / "b2",
        num_inference_steps=2,
        seed=5,
        num_images_per_prompt=3,
        batch_size=2,
        progress=False,
    )
    assert [r.seed for r in one_by_one] == [5, 6, 7]
    for a, b in zip(one_by_one, batched):
        pixels_a = np.asarray(Image.open(a.path), dtype=np.int16)
        pixels_b = np.asarray(Image.open(b.path), dtype=np.int16)
        assert np.abs(pixels_a - pixels_b).max() <= 1  # batched kernels may round differently
    assert not np.array_equal(
        np.asarray(Image.open(one_by_one[0].path)), np.asarray(Image.open(one_by_one[1].path))
    )
