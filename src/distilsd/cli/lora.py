"""``distilsd dreambooth``: teach a model a subject from a few images (LoRA or full)."""

from __future__ import annotations

import click

from distilsd.cli.options import FiniteFloat, device_option, overwrite_option, seed_option
from distilsd.distill.config import CHOICES


@click.command("dreambooth", context_settings={"show_default": True})
@click.option(
    "-m", "--model", required=True, help="Base pipeline: folder, hub id or built-in name (shapes-tiny)."
)
@click.option(
    "--instance-data",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder of subject images (captions from metadata.jsonl or .txt files, else --instance-prompt).",
)
@click.option("--instance-prompt", required=True, help='The subject with its token, e.g. "a sks hexagon".')
@click.option(
    "--class-prompt",
    "class_prompts",
    multiple=True,
    help="Prior preservation: prompt for the class images the base model generates (repeatable).",
)
@click.option(
    "--class-prompts-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="More class prompts, one per line (blank lines and # comments skipped).",
)
@click.option(
    "--num-class-images", default=100, type=int, help="Class images (kept in OUT/class_images, reused)."
)
@click.option("--prior-loss-weight", default=1.0, type=float, help="Weight of the class (prior) loss.")
@click.option(
    "--prior-target",
    type=click.Choice(["noise", "base"]),
    default="noise",
    show_default=True,
    help="What the class images learn: noise (DreamBooth's prior loss) or base (the model's own prediction "
    "with the adapters off, on the same noisy class latent: their prompts are kept where the base model has them).",
)
@click.option(
    "--refine-latents",
    default=0,
    type=int,
    help="Decoder-inversion steps for each instance image's latent, so that it decodes to the image "
    "(the encoder's mean rounds off what the VAE never saw); class images are left as encoded. 0: off.",
)
@click.option("--lora-rank", default=4, type=int, help="Rank of the LoRA adapters.")
@click.option("--lora-alpha", default=None, type=float, help="LoRA alpha (default: the rank).")
@click.option(
    "--lora-targets",
    multiple=True,
    help="Modules that get adapters, by name or name suffix (repeatable or comma-separated) "
    "[default: to_k, to_q, to_v, to_out.0].",
)
@click.option(
    "--full", is_flag=True, help="Fine-tune the whole U-Net instead of LoRA adapters (writes a pipeline)."
)
@click.option(
    "--train-token-embeddings",
    "train_instance_embeddings",
    is_flag=True,
    help="Also train the input token embeddings of the instance token (the words of --instance-prompt "
    "that no class prompt has; needs a class prompt): pivotal tuning, written as embeddings/WORD.safetensors.",
)
@click.option(
    "--train-token-embedding",
    "token_words",
    multiple=True,
    metavar="WORD",
    help="Also train the input token embedding of this word (repeatable; instead of --train-token-embeddings).",
)
@click.option(
    "--token-embedding-lr",
    default=None,
    type=float,
    help="Learning rate of the token embeddings (default: --lr).",
)
@click.option(
    "--token-embedding-steps",
    default=None,
    type=click.IntRange(min=1),
    help="Two phases: train only the token embeddings for this many of the --max-steps, then only the "
    "adapters with the embeddings frozen (default: both together from the first step).",
)
@click.option("--kohya", is_flag=True, help="Also write the adapter in the kohya / AUTOMATIC1111 layout.")
@click.option("-o", "--output-dir", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--max-steps", default=400, type=int)
@click.option(
    "--lr", "learning_rate", default=None, type=float, help="Learning rate (default: 1e-4 LoRA, 5e-6 full)."
)
@click.option("--batch-size", default=4, type=int)
@click.option(
    "--resolution", default=None, type=int, help="Training resolution (default: the model's native size)."
)
@click.option("--mixed-precision", type=click.Choice(CHOICES["mixed_precision"]), default="fp32")
@seed_option()
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its last checkpoint.")
@overwrite_option("Use an output folder that already holds something.")
@click.argument("overrides", nargs=-1)
@click.option("-q", "--quiet", is_flag=True)
def dreambooth_command(
    class_prompts,
    class_prompts_file,
    full,
    lora_rank,
    lora_targets,
    train_instance_embeddings,
    token_words,
    overrides,
    quiet,
    **options,
):
    """DreamBooth: teach MODEL the subject of --instance-data.

    Class images for prior preservation are generated with the base model (resumable,
    reused on rerun). LoRA DreamBooth (default) writes pytorch_lora_weights.safetensors;
    --full writes a pipeline folder. Extra trainer settings as key=value.

    \b
    Example:
      distilsd shapes make-data -o hexagons --count 8 --shape hexagon --two-object-fraction 0
      distilsd dreambooth -m shapes-tiny --instance-data hexagons --instance-prompt "a hexagon" \\
          --class-prompt "a circle" --class-prompt "a square" --num-class-images 64 -o runs/hexagon
      distilsd generate "a red hexagon" -m shapes-tiny --lora runs/hexagon
    """
    import logging

    from distilsd.distill.config import parse_overrides
    from distilsd.errors import InputError
    from distilsd.logging_utils import quiet_libraries
    from distilsd.lora.dreambooth import dreambooth, read_class_prompts

    quiet_libraries()
    class_prompts = list(class_prompts)
    if class_prompts_file:
        class_prompts += read_class_prompts(class_prompts_file)
    if train_instance_embeddings and token_words:
        raise InputError(
            "--train-token-embeddings trains the instance token; --train-token-embedding names the words",
            hint="give one of them",
        )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = dreambooth(
        token_embeddings=list(token_words) or train_instance_embeddings,
        class_prompts=class_prompts,
        lora_rank=None if full else lora_rank,
        lora_targets=[t.strip() for text in lora_targets for t in text.split(",") if t.strip()] or None,
        overrides=parse_overrides(overrides),
        progress=not quiet,
        **options,
    )
    what = "pipeline" if full else "LoRA"
    click.echo(f"trained {summary.steps} steps; {what} in {summary.output_dir}")


@click.group("lora")
def lora_group():
    """LoRA files: carry a teacher's LoRA over to its student."""


@lora_group.command("transfer")
@click.option(
    "--lora", "lora", required=True, help="The teacher's LoRA (file or run folder, diffusers layout)."
)
@click.option(
    "--student", required=True, help="Student made by `distilsd compress` (U-Net or pipeline folder)."
)
@click.option(
    "-o",
    "--output-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for the student's LoRA.",
)
@overwrite_option("Replace a LoRA already in the output folder.")
@click.option(
    "--steps",
    default=0,
    type=click.IntRange(min=0),
    help="Then adapt: train the student's LoRA this many steps to match teacher + LoRA (output KD).",
)
@click.option("--teacher", default=None, help="With --steps: the teacher the LoRA was made for.")
@click.option(
    "--data",
    default=None,
    type=click.Path(file_okay=False),
    help="With --steps: the instance images (captions from metadata.jsonl or .txt files, else --prompt).",
)
@click.option("--prompt", default=None, help='With --steps: the instance prompt, e.g. "a sks hexagon".')
@click.option(
    "--learning-rate",
    default=1e-4,
    type=FiniteFloat(min=0, min_open=True),
    help="With --steps: AdamW's learning rate.",
)
@click.option("--batch-size", default=2, type=click.IntRange(min=1), help="With --steps: images per step.")
@click.option(
    "--resolution", default=None, type=click.IntRange(min=8), show_default="the teacher's native size",
    help="With --steps: image size in pixels.",
)  # fmt: skip
@seed_option()
@device_option()
def transfer_command(lora, student, output_dir, overwrite, steps, teacher, data, prompt, **adapt_options):
    """Map each adapter of a teacher LoRA onto the student module the compression copied it to.

    Adapters of blocks the student dropped are dropped and counted; prints JSON with how much
    of the adapter survives. With --steps N (and --teacher, --data, --prompt), a short
    adaptation run follows: the student + LoRA learns to match the teacher + LoRA's noise
    prediction on noised latents of the instance images (only the LoRA trains); the JSON then
    has the KD loss before and after on a fixed batch.

    \b
    Examples:
      distilsd lora transfer --lora runs/hex-lora --student students/tiny -o runs/hex-lora-tiny
      distilsd lora transfer --lora runs/hex-lora --student students/tiny -o runs/hex-lora-tiny \\
        --steps 200 --teacher shapes --data hexagons/ --prompt "a sks hexagon"
    """
    import json

    from distilsd.errors import InputError
    from distilsd.lora.transfer import transfer_lora

    if steps:
        missing = [
            flag
            for flag, value in (("--teacher", teacher), ("--data", data), ("--prompt", prompt))
            if not value
        ]
        if missing:
            raise InputError(
                f"--steps needs {', '.join(missing)}",
                hint="the run matches teacher + LoRA on the instance images",
            )
    else:
        given = [
            flag for flag, value in (("--teacher", teacher), ("--data", data), ("--prompt", prompt)) if value
        ]
        if given:
            raise InputError(f"{given[0]} is for the adaptation run", hint="add --steps N")
    if steps:
        from distilsd.lora.dreambooth import read_instance_images

        read_instance_images(data, prompt, set())  # unreadable data fails before anything is written
    report = transfer_lora(lora, student, output_dir, overwrite=overwrite)
    result = report.to_json()
    if steps:
        from distilsd.lora.adapt import adapt_transferred_lora

        adaptation = adapt_transferred_lora(
            teacher, lora, student, output_dir, data=data, prompt=prompt, steps=steps, **adapt_options
        )
        result["adaptation"] = adaptation.to_json()
    click.echo(json.dumps(result, indent=2))
