"""The built-in LCM student ``shapes-tiny-lcm``: an LCM pipeline offline, sampled by default as its
run folder is (4 LCM steps, guidance 4.5 as an embedding), and the same images as plain diffusers."""

from __future__ import annotations

import json

import numpy as np
import torch

NAME = "shapes-tiny-lcm"


def test_builtin_lcm_loads_offline_as_an_lcm_pipeline():
    from diffusers import LCMScheduler

    from distilsd.generate import load_pipeline
    from distilsd.models import BUILTIN_MODELS, builtin_folder, default_guidance
    from distilsd.schedulers import few_step_defaults
    from distilsd.shapes.model import SHIPPED_DIR

    assert NAME in BUILTIN_MODELS and default_guidance(NAME) == 4.5
    shipped = SHIPPED_DIR / NAME / "unet" / "diffusion_pytorch_model.safetensors"
    assert shipped.stat().st_size < 5_000_000  # fp16, as shapes-tiny's
    loaded = load_pipeline(NAME, device="cpu")  # the tests run with HF_HUB_OFFLINE=1
    assert isinstance(loaded.pipeline.scheduler, LCMScheduler)
    assert loaded.pipeline.unet.config.time_cond_proj_dim == 256
    assert loaded.pipeline.unet.dtype == torch.float32
    info = json.loads((builtin_folder(NAME) / "distill_info.json").read_text())
    assert (info["method"], info["steps"], info["num_inference_steps"]) == ("lcm", 2000, 4)
    defaults = few_step_defaults(NAME)
    assert (defaults.num_inference_steps, defaults.guidance_scale) == (4, 4.5)
    assert few_step_defaults("shapes-tiny") is None and few_step_defaults("shapes") is None


def test_generate_samples_the_builtin_lcm_in_4_steps_as_plain_diffusers(tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from PIL import Image

    from distilsd.generate import generate
    from distilsd.models import builtin_folder

    (record,) = generate(
        ["a red circle"], model=NAME, output_dir=tmp_path, seed=1, device="cpu", progress=False
    )
    assert (record.steps, record.scheduler, record.guidance_scale) == (4, "lcm", 4.5)

    pipe = StableDiffusionPipeline.from_pretrained(builtin_folder(NAME), torch_dtype=torch.float32)
    assert isinstance(pipe.scheduler, LCMScheduler)
    expected = pipe(
        "a red circle",
        num_inference_steps=4,
        guidance_scale=4.5,
        generator=torch.Generator("cpu").manual_seed(1),
        output_type="np",
    ).images[0]
    assert not pipe.do_classifier_free_guidance  # guidance 4.5 went in as an embedding: one batch
    got = np.asarray(Image.open(record.path), dtype=np.float32) / 255.0
    assert np.abs(got - expected).max() <= 1 / 255 + 1e-6


def test_shapes_eval_defaults_to_the_lcm_models_steps_and_guidance(tmp_path, run_cli):
    code, out, err = run_cli(
        [
            "shapes",
            "eval",
            "-m",
            NAME,
            "--prompts-per-group",
            "2",
            "-o",
            str(tmp_path),
            "-q",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, err
    (scores,) = json.loads((tmp_path / "shapes_eval.json").read_text())
    assert (scores["steps"], scores["guidance_scale"]) == (4, 4.5)


def test_eval_hexagon_samples_the_lcm_model_at_its_own_steps_unless_given(run_cli, tmp_path):
    from distilsd.generate import read_png_parameters

    args = [
        "shapes",
        "eval-hexagon",
        "-m",
        NAME,
        "--prompts",
        "2",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "-q",
    ]
    code, out, err = run_cli([*args, "-o", str(tmp_path / "own")])
    assert code == 0, err
    scores = json.loads(out)
    assert (scores["steps"], scores["guidance_scale"]) == (4, 4.5)
    for png in (tmp_path / "own").glob("*.png"):
        assert "Steps: 4, Sampler: LCM, CFG scale: 4.5" in read_png_parameters(png)
    code, out, err = run_cli([*args, "-o", str(tmp_path / "given"), "--steps", "2", "-g", "3"])
    assert code == 0, err
    assert (json.loads(out)["steps"], json.loads(out)["guidance_scale"]) == (2, 3.0)
    assert "Steps: 2, Sampler: LCM, CFG scale: 3" in read_png_parameters(
        next((tmp_path / "given").glob("*.png"))
    )
