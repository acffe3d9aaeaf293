"""Export + generate round trips on the tiny pipeline: same images as PyTorch for the same seed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import psnr

STEPS = 4


def _images(pipe, prompts, seed=0, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt=prompts, negative_prompt=[""] * len(prompts), num_inference_steps=STEPS,
        generator=[torch.Generator("cpu").manual_seed(seed + k) for k in range(len(prompts))], output_type="np", **kwargs,
    ).images  # fmt: skip


@pytest.fixture(scope="module")
def torch_pipe(tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        tiny_pipeline_dir, safety_checker=None, requires_safety_checker=False
    )


@pytest.mark.parametrize("which", ["openvino", "onnx"])
def test_f32_export_matches_pytorch(which, openvino_export, onnx_cached_export, torch_pipe):
    from distilsd.deploy import exported_pipeline

    folder = openvino_export if which == "openvino" else onnx_cached_export
    pipe = exported_pipeline(folder)
    got, want = (
        _images(pipe, ["a red circle"], guidance_scale=7.5),
        _images(torch_pipe, ["a red circle"], guidance_scale=7.5),
    )
    assert got.shape == want.shape == (1, 64, 64, 3)
    assert psnr(got, want) >= 35.0
    assert want.std() > 0.01  # not a blank image


def test_batches_other_than_the_static_one_run_in_chunks(openvino_export, torch_pipe):
    """Two prompts (text encoder exported for 1) without guidance (U-Net exported for 2)."""
    from distilsd.deploy import exported_pipeline

    pipe = exported_pipeline(openvino_export)
    prompts = ["a red circle", "a blue square"]
    got, want = _images(pipe, prompts, guidance_scale=1.0), _images(torch_pipe, prompts, guidance_scale=1.0)
    assert got.shape == (2, 64, 64, 3)
    assert psnr(got, want) >= 35.0


def test_image_to_image_uses_the_exported_encoder(openvino_export, tiny_pipeline_dir):
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    from distilsd.deploy import exported_pipeline

    init = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    reference = StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny_pipeline_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe = exported_pipeline(openvino_export, task="image2image")
    got = _images(pipe, ["a red circle"], image=init, strength=0.6)
    want = _images(reference, ["a red circle"], image=init, strength=0.6)
    assert psnr(got, want) >= 35.0


def test_generate_images_writes_the_same_pngs_and_metadata(openvino_export, tiny_pipeline_dir, tmp_path):
    """The generate path (planning, seeds, PNG metadata) on an export, with another scheduler."""
    from PIL import Image

    from distilsd.deploy import load_exported_pipeline
    from distilsd.generate import GenerationSettings, load_pipeline, plan_jobs
    from distilsd.generate.core import generate_images
    from distilsd.generate.metadata import read_png_parameters
    from distilsd.generate.prompts import PromptSpec

    settings = GenerationSettings(num_inference_steps=STEPS, seed=3)
    jobs = plan_jobs([PromptSpec("a green triangle")], settings)
    exported = load_exported_pipeline(openvino_export, scheduler="euler")
    reference = load_pipeline(str(tiny_pipeline_dir), scheduler="euler", device="cpu")
    [got] = generate_images(exported, jobs, settings, tmp_path / "ov", progress=False)
    [want] = generate_images(reference, jobs, settings, tmp_path / "pt", progress=False)
    assert (
        (got.width, got.height, got.scheduler, got.seed)
        == (want.width, want.height, want.scheduler, want.seed)
        == (64, 64, "euler", 3)
    )
    as_array = [np.asarray(Image.open(r.path), dtype=np.float64) / 255 for r in (got, want)]
    assert psnr(*as_array) >= 35.0
    # Same parameters chunk apart from the model name (which says it ran on OpenVINO).
    got_parameters, want_parameters = read_png_parameters(got.path), read_png_parameters(want.path)
    assert "openvino-fp32" in got.model
    assert got_parameters.replace(got.model, want.model) == want_parameters


def test_manifest_records_source_shapes_precision_and_versions(openvino_export):
    from distilsd.deploy import MANIFEST_NAME

    manifest = json.loads((openvino_export / MANIFEST_NAME).read_text())
    assert manifest["format"] == "openvino" and manifest["precision"] == "fp32" and not manifest["dynamic"]
    assert manifest["shapes"] == {
        "width": 64, "height": 64, "batch_size": 1, "unet_batch": 2, "guidance_batch": True, "guidance_embedded": False,
        "latent_height": 8, "latent_width": 8, "vae_scale_factor": 8, "text_tokens": 77,
    }  # fmt: skip
    assert manifest["components"]["unet"]["static_shapes"]["sample"] == [2, 4, 8, 8]
    assert set(manifest["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert {"torch", "diffusers", "openvino", "distilsd"} <= set(manifest["versions"])
    assert manifest["export_peak_rss_bytes"] > 0
    assert (openvino_export / "tokenizer").is_dir() and (
        openvino_export / "scheduler" / "scheduler_config.json"
    ).exists()
