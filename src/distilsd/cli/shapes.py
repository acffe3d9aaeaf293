"""``distilsd shapes``: the Shapes world's data, judge and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import click

from distilsd.cli.options import (
    FINITE_FLOAT,
    device_option,
    guidance_option,
    lora_option,
    overwrite_option,
    seed_option,
    steps_option,
)
from distilsd.models import split_base_unet
from distilsd.shapes.model import UNET_CONFIG


def _judge_folder(ctx, param, value):
    """--judge: a built-in judge's name or an existing folder; one line naming both kinds otherwise."""
    from distilsd.errors import InputError
    from distilsd.shapes.judge import BUILTIN_JUDGES

    if value is None or value in BUILTIN_JUDGES or Path(value).is_dir():
        return value
    raise InputError(
        f"--judge {value!r} is neither a judge folder nor a built-in judge",
        hint=f"give a folder written by shapes train-judge or one of: {', '.join(BUILTIN_JUDGES)}",
    )


JUDGE_HELP = (
    "Judge to read the images with: 'two-stage' (the default: the heatmap judge with its second stage), "
    "'one-stage' (the heatmap alone, which read every result before 2026-12-04) or a folder "
    "(shapes train-judge / train-second-stage -o DIR)."
)


def judge_option(dest: str = "judge", help: str = JUDGE_HELP):
    return click.option("--judge", dest, default=None, callback=_judge_folder, help=help)


def _integers(flag: str, value: str) -> list[int]:
    """A comma-separated flag value as integers, or one line saying it is not."""
    from distilsd.errors import InputError

    try:
        return [int(item) for item in value.split(",")]
    except ValueError:
        raise InputError(f"{flag} {value!r} is not a comma-separated list of integers") from None


@click.group("shapes")
def shapes_group():
    """The Shapes world: synthetic captioned data, the judge, and model evaluation."""


@shapes_group.command("make-data", context_settings={"show_default": True})
@click.option(
    "-o",
    "--output-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder to create (images/ + metadata.jsonl).",
)
@click.option("--count", default=10000, type=int, help="Number of images.")
@seed_option(help="Data seed: the same seed gives the same data set.")
@click.option("--resolution", default=64, type=int, help="Image side in pixels.")
@click.option(
    "--two-object-fraction", default=0.5, type=FINITE_FLOAT, help="Fraction of scenes with two objects."
)
@click.option(
    "--include-held-out",
    is_flag=True,
    help="Also draw the held-out shapes (hexagon), e.g. for personalisation data.",
)
@click.option(
    "--shape",
    "shapes",
    multiple=True,
    help="Draw only this shape (repeatable), e.g. --shape hexagon for DreamBooth data.",
)
@overwrite_option()
@click.option("-q", "--quiet", is_flag=True)
def make_data_command(output_dir, quiet, **options):
    """Render a captioned Shapes data set in the image-folder + metadata.jsonl format."""
    from distilsd.shapes.data import make_data

    path = make_data(output_dir, progress=not quiet, **options)
    click.echo(str(path))


@shapes_group.command("init", context_settings={"show_default": True})
@click.option(
    "-o", "--output-dir", required=True, type=click.Path(file_okay=False), help="Pipeline folder to create."
)
@seed_option(help="Seed of the random weights.")
@click.option(
    "--unet-channels",
    default=",".join(str(c) for c in UNET_CONFIG["block_out_channels"]),
    help="Channels of the U-Net's 4 levels, comma-separated (multiples of 16).",
)
@overwrite_option()
def init_command(output_dir, seed, unet_channels, overwrite):
    """Write the untrained Shapes pipeline (SD v1 topology, random weights) to train from scratch."""
    from distilsd.shapes.model import init_model, unet_config_with_channels

    unet_config = unet_config_with_channels(_integers("--unet-channels", unet_channels))
    click.echo(str(init_model(output_dir, seed=seed, unet_config=unet_config, overwrite=overwrite)))


@shapes_group.command("train-text", context_settings={"show_default": True})
@click.option(
    "-m", "--model", required=True, type=click.Path(file_okay=False), help="Pipeline folder (`shapes init`)."
)
@click.option(
    "--data", required=True, type=click.Path(file_okay=False), help="Image folder with metadata.jsonl."
)
@click.option(
    "-o", "--output-dir", required=True, type=click.Path(file_okay=False), help="Pipeline folder to write."
)
@click.option("--steps", default=2000, type=int)
@click.option("--batch-size", default=256, type=int)
@click.option("--lr", "learning_rate", default=1e-3, type=FINITE_FLOAT)
@seed_option()
@click.option(
    "--heldout", default=1024, type=int, help="Last pairs of the data kept out to measure retrieval."
)
@overwrite_option()
@click.option("-q", "--quiet", is_flag=True)
def train_text_command(quiet, **options):
    """Pretrain the text encoder with CLIP's contrastive loss on the captions and their images."""
    from distilsd.shapes.text import pretrain_text_encoder

    report = pretrain_text_encoder(progress=not quiet, **options)
    click.echo(json.dumps(report.__dict__, indent=2))


@shapes_group.command("train-judge", context_settings={"show_default": True})
@click.option(
    "-o",
    "--output-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Where to save it (default: the one-stage judge shipped in the package).",
)
@click.option("--train-images", default=16000, type=click.IntRange(min=1))
@click.option("--epochs", default=2, type=click.IntRange(min=1))
@seed_option()
@click.option(
    "--members",
    default=1,
    type=click.IntRange(min=1),
    help="Train this many judges from seeds SEED, SEED+1, ... and read images with all of them "
    "(their probabilities averaged): the training seed alone moves a judge's reading of generated "
    "images by several points.",
)
@click.option(
    "--generated",
    multiple=True,
    type=click.Path(file_okay=False, exists=True),
    help="A labelled folder of generated images to train on too (repeatable), e.g. pseudo-labelled "
    "by scripts/label_shapes_images.py pseudo; never the shipped labelled set.",
)
@click.option(
    "--loose-fraction",
    default=0.0,
    type=FINITE_FLOAT,
    help="Fraction of objects drawn loosely, as the models draw (fat or thin stars, sparkle crosses, "
    "rounded corners, small turns and stretches).",
)
@click.option(
    "--large-fraction",
    default=0.0,
    type=FINITE_FLOAT,
    help="Fraction of one-object scenes given a radius of 0.25-0.34, as the models draw 'large'.",
)
@click.option(
    "--clipped-fraction",
    default=0.0,
    type=FINITE_FLOAT,
    help="Fraction of those large objects moved to run off the left or right edge, as the models "
    "draw 'a large ... on the left'.",
)
@click.option(
    "--rounded-hexagons",
    "rounded_hexagon_fraction",
    default=0.0,
    type=FINITE_FLOAT,
    help="Fraction of training hexagons drawn with rounded corners, as the hexagon LoRAs draw them.",
)
@click.option(
    "--rounding-chance", default=0.4, type=FINITE_FLOAT, help="Chance that augment rounds an image's corners."
)
@click.option(
    "--heldout-images",
    default=2000,
    type=click.IntRange(min=1),
    help="Held-out renders it is checked on when trained (the report).",
)
def train_judge_command(output_dir, train_images, epochs, seed, members, generated, **variants):
    """Train the Shapes judge on renders (and generated images, --generated) and report its held-out accuracy."""
    from distilsd.shapes.judge import JUDGE_DIR, train_judge

    report = train_judge(
        output_dir or JUDGE_DIR,
        train_images=train_images,
        epochs=epochs,
        seed=seed,
        members=members,
        generated=list(generated),
        **variants,
    )
    click.echo(json.dumps(report.__dict__, indent=2))


@shapes_group.command("train-second-stage", context_settings={"show_default": True})
@click.option(
    "-o",
    "--output-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Where to save the judge with its second stage (the first stage's files are copied there).",
)
@judge_option(
    help="The first stage: a heatmap judge, 'one-stage' (the default) or a folder (shapes train-judge -o DIR); "
    "given a two-stage judge, its heatmap is kept and its second stage replaced."
)
@click.option(
    "--generated",
    multiple=True,
    type=click.Path(file_okay=False, exists=True),
    help="A labelled folder of generated images to train on too (repeatable); never the shipped labelled sets.",
)
@click.option(
    "--train-images", default=16000, type=click.IntRange(min=1), help="Renders, each cut into windows."
)
@click.option("--epochs", default=2, type=click.IntRange(min=1))
@seed_option()
@click.option(
    "--loose-fraction",
    default=0.0,
    type=FINITE_FLOAT,
    help="Fraction of render objects drawn loosely (as train-judge --loose-fraction).",
)
@click.option(
    "--large-fraction",
    default=0.2,
    type=FINITE_FLOAT,
    help="Fraction of one-object render scenes given a radius of 0.25-0.34.",
)
@click.option(
    "--rounded-hexagons",
    "rounded_hexagon_fraction",
    default=0.0,
    type=FINITE_FLOAT,
    help="Fraction of render hexagons drawn with rounded corners.",
)
@click.option("-q", "--quiet", is_flag=True)
def train_second_stage_command(output_dir, judge, generated, quiet, **options):
    """Train the judge's second stage: a classifier that re-reads each object the judge proposes, from its pixels."""
    from distilsd.shapes.second_stage import train_second_stage

    report = train_second_stage(
        output_dir, judge_dir=judge, generated=list(generated), progress=not quiet, **options
    )
    click.echo(json.dumps(report.__dict__, indent=2))


@shapes_group.command("check-judge")
@click.option("--count", default=2000, type=int, help="Held-out renders to check.")
@click.option(
    "--labelled",
    default=None,
    type=click.Path(file_okay=False),
    help="Folder of labelled generated images to check on (labels.jsonl + images; default: the two shipped "
    "sets, the models' images and the hexagon LoRAs' ones; see docs/shapes-eval.md).",
)
@judge_option("judge_dir")
def check_judge_command(count, labelled, judge_dir):
    """Accuracy of the judge on held-out renders, and on labelled generated images (--labelled)."""
    from distilsd.shapes.judge import evaluate_judge, load_judge
    from distilsd.shapes.labelled import HEXAGON_LABELLED_DIR, LABELLED_DIR, check_on_labelled

    judge = load_judge(judge_dir)
    report = evaluate_judge(judge, count=count)
    results = {
        "renders": {
            "heldout_images": report.heldout_images,
            "scene_accuracy": report.heldout_scene_accuracy,
            "caption_alignment": report.heldout_caption_alignment,
        }
    }
    results["generated"] = check_on_labelled(judge, labelled or LABELLED_DIR)
    if labelled is None:
        results["generated_hexagon"] = check_on_labelled(judge, HEXAGON_LABELLED_DIR)
    click.echo(json.dumps(results, indent=2))


@shapes_group.command("check-vae", context_settings={"show_default": True})
@click.option("-m", "--model", required=True, help="Pipeline folder (its vae/) or VAE folder.")
@click.option(
    "--prompts-per-group", default=200, type=int, help="Held-out scenes per group (1 and 2 objects)."
)
@click.option(
    "--tiny-vae",
    default=None,
    help="Decode the VAE's latents with this tiny VAE (a folder, or 'tiny' for the model's own) instead.",
)
@judge_option()
def check_vae_command(model, prompts_per_group, tiny_vae, judge):
    """Judge alignment of a VAE's reconstructions of held-out renders (gate: >= 0.95 before a teacher).

    With --tiny-vae, of the tiny decoder's (gate: within 0.03 of the VAE's own).
    """
    from dataclasses import asdict

    from distilsd.shapes.evaluate import vae_scores

    scores = vae_scores(model, prompts_per_group=prompts_per_group, tiny_vae=tiny_vae, judge=judge)
    click.echo(json.dumps(asdict(scores), indent=2))


@shapes_group.command("check-text", context_settings={"show_default": True})
@click.option("-m", "--model", required=True, help="Pipeline folder; BASE::UNET swaps a U-Net into BASE.")
@click.option("--samples", default=128, type=int, help="Held-out scenes (half 1-object, half 2-object).")
@click.option("--timesteps", default="300,500,700", help="Comma-separated noise levels to test at.")
@device_option()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def check_text_command(model, samples, timesteps, device, as_json):
    """Does the U-Net read its caption? Loss rise when colour, shape or position words are swapped.

    A word kind whose swap leaves the loss unchanged is one the model ignores: it will not
    learn to draw it by training longer, look at the text encoder first.
    """
    from dataclasses import asdict

    from distilsd.shapes.evaluate import caption_use, caption_use_table

    steps = tuple(_integers("--timesteps", timesteps))
    base, unet = split_base_unet(model)
    scores = caption_use(base, unet=unet, samples=samples, timesteps=steps, device=device)
    click.echo(json.dumps(asdict(scores), indent=2) if as_json else caption_use_table(scores))


@shapes_group.command("eval", context_settings={"show_default": True})
@click.option(
    "-m",
    "--model",
    "models",
    multiple=True,
    required=True,
    help="Model to score (repeat to compare several); BASE::UNET swaps a student U-Net into BASE.",
)
@click.option(
    "-o",
    "--output-dir",
    default="outputs/shapes-eval",
    type=click.Path(file_okay=False),
    help="Generated images go in OUTPUT_DIR/<model>/; results in OUTPUT_DIR/shapes_eval.json.",
)
@click.option(
    "--prompts-per-group",
    default=200,
    type=int,
    help="Held-out prompts per group (single-object, two-object).",
)
@click.option(
    "--prompt-seed",
    default=303,
    type=int,
    help="Seed of the held-out prompt set (303: the one every published Shapes number uses).",
)
@steps_option("Denoising steps. Default: 25, or what an LCM model was distilled for (4).")
@guidance_option("Default: 7.5, or an LCM model's own (4.5 for shapes-tiny-lcm).")
@click.option("-s", "--scheduler", default=None, help="Scheduler short name (default: the model's own).")
@click.option("--batch-size", default=8, type=int)
@click.option("--vae", default=None, help="A tiny VAE for every model: a folder, or 'tiny' (generate --vae).")
@click.option("--deepcache", default=None, type=int, help="DeepCache interval (generate --deepcache).")
@click.option("--tome", default=None, type=FINITE_FLOAT, help="Token merging ratio (generate --tome).")
@device_option()
@judge_option()
@click.option("-q", "--quiet", is_flag=True)
def eval_command(models, output_dir, quiet, **options):
    """Score models on held-out Shapes prompts: alignment (1 and 2 objects), Shapes-FID, s/image.

    Alignment is 'exact' (the prompt's objects and no others) and 'contains' (extras
    allowed), each with a 95% bootstrap interval over prompts. With several models, also
    each one's alignment minus every earlier one's, paired on the same prompts and seeds,
    with its interval; and each one's fidelity to the first: Shapes-FID between their
    images and PSNR, e.g. an int8 export against the f32 one. What the judge read in each
    image is in OUTPUT_DIR/<model>/judged.jsonl.
    """
    from distilsd.generate.core import slugify
    from distilsd.logging_utils import quiet_libraries
    from distilsd.shapes.evaluate import (
        add_differences,
        add_fidelity_to_first,
        scores_table,
        scores_to_json,
        shapes_eval,
    )

    quiet_libraries()
    results = []
    # One folder per model; long names can slug alike (a base and base::unet), so number repeats.
    slugs: list[str] = []
    for model in models:
        slug = slugify(model)
        slugs.append(slug if slug not in slugs else f"{slug}-{len(slugs) + 1}")
    image_dirs = [Path(output_dir) / slug for slug in slugs]
    for model, image_dir in zip(models, image_dirs, strict=True):
        base, unet = split_base_unet(model)
        results.append(shapes_eval(base, image_dir, unet=unet, progress=not quiet, **options))
    if len(results) > 1:
        add_fidelity_to_first(results, image_dirs, judge=options["judge"])
        add_differences(results)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(output_dir) / "shapes_eval.json.tmp"
    tmp.write_text(json.dumps([scores_to_json(s) for s in results], indent=2) + "\n")
    tmp.replace(Path(output_dir) / "shapes_eval.json")
    click.echo(scores_table(results))


@shapes_group.command("eval-hexagon", context_settings={"show_default": True})
@click.option("-m", "--model", default="shapes-tiny", help="Pipeline or built-in name.")
@lora_option("LoRA(s) to apply (repeatable).")
@click.option(
    "-o", "--output-dir", required=True, type=click.Path(file_okay=False), help="Folder for the images."
)
@click.option(
    "--prompts", default=100, type=click.IntRange(min=1), help="Hexagon prompts ('a COLOR hexagon ...')."
)
@click.option(
    "--prompt-seed",
    default=404,
    type=int,
    help="Seed of the hexagon prompts (404: the reported set; another one to tune settings on).",
)
@click.option(
    "--prior-prompts",
    default=0,
    type=click.IntRange(min=0),
    help="Also the first N usual held-out single-object prompts.",
)
@click.option(
    "--compare-base",
    is_flag=True,
    help="Also run the model without its LoRAs on the same prompts and seeds; report paired differences.",
)
@steps_option("Default: 25, or an LCM model's own (4 for shapes-tiny-lcm).")
@guidance_option("Default: the model's (4.5 for the Shapes models; an LCM model's own).")
@click.option("--batch-size", default=8, type=int)
@seed_option()
@device_option()
@judge_option()
@click.option("-q", "--quiet", is_flag=True)
def eval_hexagon_command(model, loras, output_dir, quiet, **options):
    """Score how well a model (with LoRAs) draws the held-out hexagon in the prompt's colour.

    Prints JSON: the share of images in which the judge finds a hexagon of the prompt's
    colour (with a 95% Wilson interval), the share also at the stated position, and with
    --prior-prompts the usual single-object alignment (what prior preservation keeps).
    --compare-base adds the model without its LoRAs on the same prompts and seeds (images in
    OUTPUT_DIR/base) and the paired differences, LoRA minus base, with 95% bootstrap
    intervals: subject_gain and prior_change.
    """
    from distilsd.logging_utils import quiet_libraries
    from distilsd.shapes.personalise import score_subject

    quiet_libraries()
    scores = score_subject(model, output_dir, loras=list(loras), progress=not quiet, **options)
    click.echo(json.dumps(scores.to_json(), indent=2))
