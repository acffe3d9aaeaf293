"""``distilsd convert``: a diffusers SD 1.x/2.x pipeline folder -> one original-layout checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from distilsd.cli.options import dtype_option, overwrite_option


@click.command("convert")
@click.argument("pipeline_dir", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "output_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Checkpoint to write; must end in .safetensors.",
)
@dtype_option(
    "Cast the weights to this precision (default: keep each model's stored precision).", default=None
)
@overwrite_option("Replace the output file if it exists.")
def convert_command(pipeline_dir: Path, output_path: Path, dtype: str | None, overwrite: bool) -> None:
    """Convert a diffusers SD 1.x/2.x pipeline folder into one original-layout .safetensors checkpoint.

    The file has the CompVis/LDM key names (model.diffusion_model.*, first_stage_model.*,
    cond_stage_model.*) that AUTOMATIC1111, ComfyUI and diffusers' from_single_file load.
    """
    # Imported here so that `distilsd --help` stays free of torch.
    from distilsd.convert import convert_pipeline_to_single_file

    written = convert_pipeline_to_single_file(pipeline_dir, output_path, dtype=dtype, overwrite=overwrite)
    size_mb = written.stat().st_size / 2**20
    click.echo(f"wrote {written} ({size_mb:.1f} MiB)")
