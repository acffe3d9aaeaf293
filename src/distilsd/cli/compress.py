"""``distilsd compress`` and ``distilsd arch``: thin adapters over :mod:`distilsd.compress`."""

from __future__ import annotations

import json

import click

from distilsd.cli.options import allow_pickle_option, overwrite_option, seed_option
from distilsd.compress.layouts import PRESET_ALIASES, PRESET_DESCRIPTIONS

PRESETS_HELP = "; ".join(f"{name}: {text}" for name, text in PRESET_DESCRIPTIONS.items())
ALIASES_HELP = ", ".join(f"{alias}={name}" for alias, name in PRESET_ALIASES.items())

ARCH_HELP = (
    f"Student architecture: a preset ({', '.join(PRESET_DESCRIPTIONS)}; aliases {ALIASES_HELP}) or a YAML/JSON "
    "layout spec file (keys: name, base, down_layers, up_layers, mid_block, drop_stages)."
)


@click.command(
    "compress",
    epilog="\b\nPresets:\n" + "\n".join(f"  {name:9s} {text}" for name, text in PRESET_DESCRIPTIONS.items()),
)
@click.option(
    "--teacher",
    "-t",
    required=True,
    metavar="MODEL",
    help="Pipeline folder, U-Net folder, hub id, built-in model (shapes), or sd-v1/sd-v2 (architecture only).",
)
@click.option("--arch", "-a", required=True, metavar="NAME|SPEC", help=ARCH_HELP)
@click.option(
    "--output",
    "-o",
    "output_dir",
    type=click.Path(file_okay=False),
    help="Folder to write (refused if it exists, unless --overwrite).",
)
@click.option(
    "--init",
    type=click.Choice(["teacher", "random"]),
    default="teacher",
    show_default=True,
    help="Initialise from the teacher (BK-SDM mapping) or randomly.",
)
@click.option(
    "--pipeline",
    is_flag=True,
    help="Write a whole pipeline: the teacher's text encoder, VAE, tokenizer, scheduler + the student U-Net.",
)
@overwrite_option("Replace an existing output folder (once the new one is complete).")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check everything and print the tensor mapping; load no weights, write nothing.",
)
@allow_pickle_option("Allow a teacher whose weights are only pickled .bin files (they can run code).")
@seed_option(default=None, help="Seed for --init random.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (or the dry-run mapping) as JSON.")
def compress_command(
    teacher, arch, output_dir, init, pipeline, overwrite, dry_run, allow_pickle, seed, as_json
):
    """Build a BK-SDM-style student U-Net from a teacher.

    The student is saved in diffusers format (UNet2DConditionModel.from_pretrained reloads
    it), with distilsd_compress.json beside the weights: the layout, the removed blocks, the
    distillation feature pairs and which teacher tensor went to which student tensor.
    """
    from distilsd.compress import compress
    from distilsd.models import BUILTIN_MODELS, builtin_folder

    # Built-in names are resolved here: distilsd.compress sits below distilsd.models.
    result = compress(
        builtin_folder(teacher) if teacher in BUILTIN_MODELS else teacher,
        arch,
        output_dir=output_dir,
        pipeline=pipeline,
        init=init,
        overwrite=overwrite,
        dry_run=dry_run,
        allow_pickle=allow_pickle,
        seed=seed,
    )
    record = result.record()
    if as_json:
        if result.output_dir is not None:
            record["output_dir"] = str(result.output_dir)
        click.echo(json.dumps(record, indent=2))
        return
    if dry_run:
        click.echo(
            f"dry run: {result.layout.name} from {result.teacher.name} ({result.init} init); nothing written"
        )
        click.echo(f"student U-Net params: {result.student_params:,} (teacher {result.teacher_params:,})")
        click.echo(f"removed: {', '.join(record['removed_blocks']) or 'nothing'}")
        if result.init == "random":
            click.echo("random init: no teacher tensor is copied")
        else:
            click.echo(f"mapping ({len(result.mapping)} tensors, student <- teacher):")
            width = max(len(name) for name in result.mapping)
            for student_name, teacher_name in result.mapping.items():
                click.echo(f"  {student_name.ljust(width)} <- {teacher_name}")
        return
    what = "pipeline" if result.pipeline else "U-Net"
    click.echo(
        f"wrote {result.layout.name} student {what} to {result.output_dir} "
        f"({result.student_params:,} U-Net params, {100 * result.student_params / result.teacher_params:.1f}% of the teacher; "
        f"{len(result.mapping)} tensors from the teacher)"
    )


@click.command("arch")
@click.option(
    "--teacher",
    "-t",
    default="sd-v1",
    show_default=True,
    metavar="MODEL",
    help="sd-v1, sd-v2 (shipped configs), a pipeline or U-Net folder, or a hub id. Only configs are read.",
)
@click.option(
    "--arch",
    "-a",
    "archs",
    multiple=True,
    metavar="NAME|SPEC",
    help="Student to compare (repeatable; default: bk-base, bk-small, bk-tiny). " + ARCH_HELP,
)
@click.option(
    "--resolution",
    "-r",
    type=int,
    default=None,
    help="Image size in pixels (default: the teacher's native size).",
)
@click.option(
    "--batch-size", type=int, default=1, show_default=True, help="Batch of the measured U-Net forward."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def arch_command(teacher, archs, resolution, batch_size, as_json):
    """Parameters, MACs and per-block breakdown of a teacher and its students.

    MACs per U-Net forward are counted by PyTorch's FlopCounterMode on a meta-device model
    (no weights, no memory), MACs = FLOPs/2: convs+linears (what BK-SDM reports) and the
    attention matmuls (q@k^T and softmax@v) separately. Also shows the removed blocks and
    the teacher feature map each student block is matched to in distillation.
    """
    from distilsd.compress import describe_architecture
    from distilsd.compress.analysis import DEFAULT_ARCHS

    report = describe_architecture(
        teacher, archs or DEFAULT_ARCHS, resolution=resolution, batch_size=batch_size
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.format_table())
