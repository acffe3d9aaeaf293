"""``distilsd generate`` and ``distilsd schedulers``."""

from __future__ import annotations

import json

import click

from distilsd.cli.options import (
    FINITE_FLOAT,
    SEED,
    allow_pickle_option,
    device_option,
    dtype_option,
    guidance_option,
    lora_option,
    lora_skip_unknown_option,
    overwrite_option,
    steps_option,
)
from distilsd.deploy.runtime import PRECISIONS
from distilsd.generate.loading import BACKENDS
from distilsd.models import BUILTIN_MODELS, DEFAULT_MODEL
from distilsd.schedulers import DEFAULT_SCHEDULER, SCHEDULERS

SCHEDULER_HELP = "Scheduler (default: the model's own, usually pndm): " + ", ".join(SCHEDULERS) + "."


@click.command("generate", context_settings={"show_default": True})
@click.argument("prompt", nargs=-1)
@click.option(
    "-m",
    "--model",
    default=DEFAULT_MODEL,
    help="Diffusers pipeline folder, .safetensors checkpoint, hub id (owner/name) or built-in name ("
    + ", ".join(BUILTIN_MODELS)
    + ").",
)
@click.option(
    "--unet",
    default=None,
    help="Swap in this U-Net: a U-Net folder, a pipeline folder (its unet/) or a hub id.",
)
@click.option(
    "--config",
    "config",
    default=None,
    help="For single-file checkpoints: a diffusers folder or hub id of the same model family to take component configs from (needed offline).",
)
@allow_pickle_option()
@lora_option()
@click.option(
    "--fuse-lora", is_flag=True, help="Fold the LoRAs into the weights (as fast as the model alone)."
)
@lora_skip_unknown_option()
@click.option(
    "-o", "--output-dir", default="outputs", type=click.Path(file_okay=False), help="Folder for the PNGs."
)
@click.option(
    "-f",
    "--prompt-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Prompts from a file: .txt (one a line) or .jsonl ({'prompt', 'negative_prompt', 'seed', 'name'} a line).",
)
@click.option("-n", "--negative", "negative_prompt", default="", help="Negative prompt.")
@click.option(
    "-s",
    "--scheduler",
    type=click.Choice(list(SCHEDULERS)),
    default=None,
    show_default=False,
    help=SCHEDULER_HELP,
)
@steps_option("Denoising steps. Default: 25; what an LCM model or LCM-LoRA was distilled for (4).")
@guidance_option(
    "Classifier-free guidance scale (1 = off). Default: 7.5; 4.5 for the built-in shapes models and their exports."
)
@click.option(
    "--seed", default=0, type=SEED, help="Seed of the first image; image k of a prompt uses seed + k."
)
@click.option("--num-images", "num_images_per_prompt", default=1, type=int, help="Images per prompt.")
@click.option(
    "--batch-size", default=1, type=int, help="Images per pipeline call (does not change the images)."
)
@click.option(
    "-W",
    "--width",
    default=None,
    type=int,
    show_default="model's native size",
    help="Width in pixels (multiple of 8).",
)
@click.option(
    "-H",
    "--height",
    default=None,
    type=int,
    show_default="model's native size",
    help="Height in pixels (multiple of 8).",
)
@click.option(
    "--init-image",
    type=click.Path(dir_okay=False),
    default=None,
    help="Image-to-image: start from this image.",
)
@click.option(
    "--strength",
    default=0.8,
    type=FINITE_FLOAT,
    help="Image-to-image / inpainting: how much of the init image to repaint (0-1].",
)
@click.option(
    "--mask",
    type=click.Path(dir_okay=False),
    default=None,
    help="Inpainting: white = repaint, black = keep; same size as --init-image.",
)
@dtype_option()
@device_option()
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="pytorch",
    help="pytorch, or OpenVINO / ONNX Runtime: exported on the fly into a cache keyed by model, size and precision (needs distilsd[deploy]).",
)
@click.option(
    "--precision",
    type=click.Choice([*PRECISIONS, "auto", "f32"]),
    default="auto",
    help="With --backend openvino/onnx: fp32, bf16 (fp32 on CPUs without bf16), int8 (NNCF), or auto: bf16 where this CPU runs it natively (AVX-512 BF16 / AMX), else fp32 (ONNX: fp32); f32 is the old spelling of fp32. --dtype is PyTorch's.",
)
@click.option(
    "--vae",
    default=None,
    help="Swap in a tiny VAE (TAESD architecture): a folder from `distilsd train --component tiny-vae`, or 'tiny' for the model's own (random weights for architecture names). With --backend openvino/onnx it is exported in place of the model's VAE.",
)
@click.option(
    "--deepcache",
    default=None,
    type=int,
    help="DeepCache: run the U-Net's deep blocks on 1 of every N steps and reuse them in between (1 = off). PyTorch backend.",
)
@click.option(
    "--tome",
    default=None,
    type=FINITE_FLOAT,
    help="Token merging: merge this share of the tokens (0-0.75) before the highest-resolution self-attention (tomesd). PyTorch backend.",
)
@click.option("--no-safety-checker", is_flag=True, help="Do not run the model's safety checker.")
@click.option("--attention-slicing", is_flag=True, help="Compute attention in slices (less memory, slower).")
@click.option("--vae-slicing", is_flag=True, help="Decode a batch one image at a time (less memory).")
@click.option("--vae-tiling", is_flag=True, help="Decode in tiles (large images with little memory).")
@click.option("--channels-last", is_flag=True, help="channels_last memory format for the U-Net and VAE.")
@overwrite_option("Replace existing images made with other parameters (default: refuse).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON record of every image on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def generate_command(prompt, prompt_file, as_json, quiet, no_safety_checker, **options):
    """Generate images for PROMPT (or --prompt-file) with any SD-family model.

    Images are written as OUTPUT_DIR/<prompt#>-<image#>-<prompt-slug>.png with their
    parameters in the PNG text chunk 'parameters' (AUTOMATIC1111's format). A rerun skips
    the images already written, so a killed batch resumes where it stopped.

    \b
    Examples:
      distilsd generate "a red circle" --model shapes-tiny
      distilsd generate "a castle" --model CompVis/stable-diffusion-v1-4 --unet nota-ai/bk-sdm-tiny
      distilsd generate -f prompts.txt --num-images 4 --batch-size 2 --scheduler dpm++ --steps 20
      distilsd generate "a castle at night" --init-image castle.png --strength 0.6
      distilsd generate "a red circle" --backend openvino --precision int8
      distilsd generate "a red circle" --vae tiny --deepcache 3     # docs/fast.md
      distilsd generate "a red circle" --model exported/    # a folder made by `distilsd export`
      distilsd generate "a sks hexagon" --model shapes-tiny --lora runs/hex-lora:0.8
      distilsd generate "a red circle" --model runs/shapes/tiny-lcm     # 4 LCM steps (docs/lcm.md)
    """
    from distilsd.errors import InputError
    from distilsd.generate import PromptSpec, generate, read_prompt_file, records_to_json
    from distilsd.logging_utils import quiet_libraries

    if prompt and prompt_file:
        raise InputError("give prompts either as arguments or with --prompt-file, not both")
    if prompt_file:
        specs = read_prompt_file(prompt_file)
    else:
        text = " ".join(prompt).strip()
        if not text:
            raise InputError(
                "no prompt given", hint='distilsd generate "a red circle", or --prompt-file FILE'
            )
        specs = [PromptSpec(text)]

    quiet_libraries()
    records = generate(specs, safety_checker=not no_safety_checker, progress=not quiet, **options)
    if as_json:
        click.echo(json.dumps({"images": records_to_json(records)}, indent=2))
    else:
        for record in records:
            click.echo(record.path)
        written = sum(not r.skipped for r in records)
        click.echo(f"{written} image(s) written, {len(records) - written} already there", err=True)


@click.command("schedulers")
def schedulers_command():
    """List the schedulers `distilsd generate --scheduler` accepts."""
    width = max(len(name) for name in SCHEDULERS)
    for spec in SCHEDULERS.values():
        default = " (default of SD v1 models)" if spec.name == DEFAULT_SCHEDULER else ""
        click.echo(
            f"{spec.name:<{width}}  {spec.class_name:<30} A1111: {spec.a1111_name:<13} {spec.description}{default}"
        )
