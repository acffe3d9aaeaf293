"""``distilsd export``: an SD pipeline to OpenVINO IR or ONNX, for fast CPU generation."""

from __future__ import annotations

import click

from distilsd.cli.options import allow_pickle_option, lora_option, overwrite_option
from distilsd.deploy.runtime import PRECISIONS


@click.command("export", context_settings={"show_default": True})
@click.option(
    "-m",
    "--model",
    required=True,
    help="Pipeline folder, .safetensors checkpoint, hub id, built-in name, or an architecture with random weights (sd-v1, sd-v2, bk-tiny, sd-v1:bk-small).",
)
@click.option("--unet", default=None, help="Swap in this U-Net before exporting (as in generate).")
@click.option(
    "--format", "fmt", type=click.Choice(["openvino", "onnx"]), default="openvino", help="Runtime format."
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),
    help="Folder to write (refused if it exists and is not empty, unless --overwrite).",
)
@click.option(
    "-W",
    "--width",
    default=None,
    type=int,
    show_default="model's native size",
    help="Image width the static shapes are made for.",
)
@click.option(
    "-H",
    "--height",
    default=None,
    type=int,
    show_default="model's native size",
    help="Image height the static shapes are made for.",
)
@click.option(
    "--batch",
    "batch_size",
    default=1,
    type=int,
    help="Images per pipeline call (the U-Net gets 2x for classifier-free guidance).",
)
@click.option(
    "--precision",
    type=click.Choice([*PRECISIONS, "auto", "f32"]),
    default="fp32",
    help="fp32; bf16 (OpenVINO, falls back to fp32 on CPUs without bf16); int8 (OpenVINO, NNCF); auto: bf16 where this CPU runs it natively (AVX-512 BF16 / AMX), else fp32. f32 is the old spelling of fp32.",
)
@click.option(
    "--dynamic", is_flag=True, help="Dynamic batch and image size instead of static shapes (slower)."
)
@click.option(
    "--no-guidance-batch",
    is_flag=True,
    help="Export the U-Net for guidance_scale <= 1 (batch = --batch, not 2x).",
)
@click.option("--no-vae-encoder", is_flag=True, help="Skip the VAE encoder (no image-to-image / inpainting).")
@click.option(
    "--calibration-prompts",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="int8: a text file of prompts (one a line) to calibrate on.",
)
@click.option(
    "--calibration-steps", default=10, type=int, help="int8: denoising steps per calibration prompt."
)
@click.option(
    "--openvino-frontend",
    type=click.Choice(["onnx", "pytorch"]),
    default="onnx",
    help="OpenVINO: read the model through ONNX (faster) or with convert_model on the torch module.",
)
@click.option(
    "--config",
    "config",
    default=None,
    help="For single-file checkpoints: a diffusers folder of the same family (as in generate).",
)
@click.option(
    "--vae",
    default=None,
    metavar="PATH|tiny",
    help="Export a tiny VAE (TAESD architecture) in place of the model's VAE: a folder from `distilsd train --component tiny-vae`, or 'tiny' for the model's own (random weights for architecture names).",
)
@lora_option("Fuse this LoRA into the weights before exporting (repeatable; as in generate --lora).")
@allow_pickle_option()
@overwrite_option("Replace an existing export in --output.")
def export_command(model, unet, fmt, output, width, height, batch_size, precision, dynamic, no_guidance_batch, no_vae_encoder,
                   calibration_prompts, calibration_steps, openvino_frontend, config, vae, loras, allow_pickle, overwrite):  # fmt: skip
    """Export text encoder, U-Net, VAE decoder (and encoder), tokenizer and scheduler to OUTPUT.

    The folder runs with `distilsd generate --model OUTPUT` (same options, seeds and PNG
    metadata as the PyTorch path). Its manifest, distilsd-export.json, is written last: a
    folder without it is an unfinished export and is refused.

    \b
    Examples:
      distilsd export -m tiny-random --format openvino -o tiny-ov
      distilsd export -m bk-tiny --format openvino --precision bf16 -W 512 -H 512 -o bk-tiny-ov-bf16
      distilsd export -m ./my-sd15 --format onnx -o my-sd15-onnx
    """
    import json
    from pathlib import Path

    from distilsd.deploy import ExportSettings, export_model
    from distilsd.logging_utils import quiet_libraries

    prompts = None
    if calibration_prompts:
        prompts = [
            line.strip()
            for line in Path(calibration_prompts).read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        if not prompts:  # an empty list would fall back to the default prompts unnoticed
            from distilsd.errors import InputError

            raise InputError(
                f"--calibration-prompts {calibration_prompts} has no prompts", hint="write one prompt a line"
            )
    settings = ExportSettings(
        format=fmt, precision=precision, width=width, height=height, batch_size=batch_size, guidance=not no_guidance_batch,
        dynamic=dynamic, vae_encoder=not no_vae_encoder, calibration_prompts=prompts, calibration_steps=calibration_steps,
        openvino_frontend=openvino_frontend,
    )  # fmt: skip
    settings.validate()
    quiet_libraries()
    folder = export_model(
        model,
        output,
        settings,
        unet=unet,
        allow_pickle=allow_pickle,
        config=config,
        overwrite=overwrite,
        loras=loras,
        vae=vae,
    )
    manifest = json.loads((folder / "distilsd-export.json").read_text(encoding="utf-8"))
    shapes = manifest["shapes"]
    click.echo(
        f"exported {manifest['source']['name']} to {fmt} ({manifest['precision']}, {shapes['width']}x{shapes['height']}, batch {shapes['batch_size']}"
        f"{', dynamic' if dynamic else ''}) in {manifest['export_seconds']:.1f} s, peak memory {manifest['export_peak_rss_bytes'] / 2**30:.2f} GiB",
        err=True,
    )
    click.echo(str(folder))
