"""``distilsd eval``: the BK-SDM evaluation protocol (generate, score, sweep)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from distilsd.cli.options import FINITE_FLOAT, SEED, device_option, dtype_option
from distilsd.schedulers import SCHEDULERS

METRIC_NAMES = ("fid", "is", "clip")


@click.group("eval", context_settings={"show_default": True})
def eval_group():
    """Evaluate models with the BK-SDM protocol: generate images, score them, sweep guidance."""


def model_options(function):
    function = click.option(
        "--unet", default=None, help="Swap in this U-Net (U-Net folder, pipeline folder or hub id)."
    )(function)
    function = click.option(
        "-m",
        "--model",
        required=True,
        help="Pipeline folder, .safetensors checkpoint, hub id or built-in name.",
    )(function)
    return function


def generation_options(function):
    for decorator in reversed(
        [
            click.option(
                "-s",
                "--scheduler",
                type=click.Choice(list(SCHEDULERS)),
                default="pndm",
                help="Scheduler (protocol: pndm).",
            ),
            click.option(
                "--steps", "num_inference_steps", default=25, type=int, help="Denoising steps (protocol: 25)."
            ),
            click.option(
                "--size", default=512, type=int, help="Generated image size in pixels (protocol: 512)."
            ),
            click.option(
                "--copy-size",
                default=256,
                type=int,
                help="Also write a resized copy for scoring (protocol: 256); 0 = none.",
            ),
            click.option(
                "--seed",
                default=1234,
                type=SEED,
                help="Noise seed (protocol: 1234): caption i starts from noise seeded by (seed, i).",
            ),
            click.option("-n", "--negative", "negative_prompt", default="", help="Negative prompt."),
            click.option(
                "--batch-size",
                default=1,
                type=int,
                help="Images per pipeline call (does not change the images).",
            ),
            dtype_option(
                "Weights and compute precision; auto = fp16 on a GPU (protocol), fp32 on the CPU.",
                default="auto",
                auto=True,
            ),
            click.option(
                "--format",
                "image_format",
                type=click.Choice(("jpeg", "png")),
                default="jpeg",
                help="Image files: JPEG quality 75 as BK-SDM writes (protocol), or PNG.",
            ),
            device_option("auto = the accelerate process's device."),
            click.option(
                "--limit",
                default=None,
                type=int,
                help="Use a random sample of N captions (seeded by --sample-seed, in file order).",
            ),
            click.option("--sample-seed", default=0, type=int, help="Seed of the --limit sample."),
        ]
    ):
        function = decorator(function)
    return function


def _eval_settings(options: dict, guidance_scale: float):
    from distilsd.evaluate.generate import EvalGenerationSettings

    return EvalGenerationSettings(
        scheduler=options["scheduler"],
        num_inference_steps=options["num_inference_steps"],
        guidance_scale=guidance_scale,
        size=options["size"],
        copy_size=options["copy_size"] or None,
        seed=options["seed"],
        negative_prompt=options["negative_prompt"],
        batch_size=options["batch_size"],
        dtype=options["dtype"],
        image_format=options["image_format"],
    )


def _read_captions(prompts: str, options: dict):
    """The captions to generate, each with its noise seed from its line in the whole file."""
    from distilsd.errors import InputError
    from distilsd.evaluate.generate import sample_captions, with_caption_seeds
    from distilsd.evaluate.prompts import read_caption_file

    limit = options["limit"]
    if limit is not None and limit < 1:
        raise InputError(f"--limit {limit} must be >= 1")
    specs = with_caption_seeds(read_caption_file(prompts), options["seed"])
    if limit is not None:
        specs = sample_captions(specs, limit, options["sample_seed"])
    return specs


@eval_group.command("generate", context_settings={"show_default": True})
@model_options
@click.option(
    "-p",
    "--prompts",
    required=True,
    type=click.Path(dir_okay=False),
    help="Caption file: BK-SDM metadata.csv (file_name,text), .jsonl or .txt.",
)
@click.option(
    "-o",
    "--output-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Run folder: images go to im<size>/ and im<copy-size>/.",
)
@click.option(
    "-g",
    "--guidance",
    "guidance_scale",
    default=7.5,
    type=FINITE_FLOAT,
    help="Classifier-free guidance scale (protocol: 7.5).",
)
@generation_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def generate_command(model, unet, prompts, output_dir, guidance_scale, quiet, **options):
    """Generate the evaluation images for a caption file (BK-SDM protocol defaults).

    Run it under `accelerate launch` to split the captions across processes; rerun it to
    resume a killed run (finished images are kept and skipped).

    \b
    Examples:
      distilsd eval generate -m CompVis/stable-diffusion-v1-4 --unet nota-ai/bk-sdm-tiny -p metadata.csv -o runs/tiny
      accelerate launch --num_processes 4 -m distilsd eval generate -m ... -p metadata.csv -o runs/tiny
    """
    from distilsd.evaluate.generate import generate_eval_images
    from distilsd.logging_utils import quiet_libraries

    settings = _eval_settings(options, guidance_scale)
    settings.generation_settings()  # validate flags before reading captions or weights
    specs = _read_captions(prompts, options)
    quiet_libraries()
    summary = generate_eval_images(
        model, specs, output_dir, settings, unet=unet, device=options["device"], progress=not quiet
    )
    if "num_images" in summary:  # the main process reports the whole run
        click.echo(summary["folders"]["full"])
        if summary["folders"]["copy"]:
            click.echo(summary["folders"]["copy"])


@eval_group.command("score", context_settings={"show_default": True})
@click.option(
    "-i",
    "--images",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder of generated images (the protocol scores the 256 px copies, im256/).",
)
@click.option(
    "-r",
    "--reference",
    default=None,
    type=click.Path(),
    help="FID reference: an image folder or pytorch-fid statistics (.npz with mu, sigma).",
)
@click.option(
    "-p",
    "--prompts",
    default=None,
    type=click.Path(dir_okay=False),
    help="Caption file for CLIP score (default: each PNG's own prompt).",
)
@click.option(
    "--metrics",
    "metric_list",
    default="fid,is,clip",
    help="Comma-separated: " + ", ".join(METRIC_NAMES) + ".",
)
@click.option(
    "--size",
    default=256,
    type=int,
    help="Images not size x size are resized to it (PIL bicubic) before scoring.",
)
@click.option(
    "--inception-weights",
    default=None,
    type=click.Path(dir_okay=False),
    help="FID/IS Inception weights (pt_inception-2015-12-05-6726825d.pth); default: torch hub's cache.",
)
@click.option("--clip-model", default="ViT-g-14", help="open_clip model name, or local-dir:FOLDER.")
@click.option(
    "--clip-pretrained",
    default="laion2b_s34b_b88k",
    help="open_clip pretrained tag (weights from the Hugging Face cache).",
)
@click.option(
    "--clip-weights",
    default=None,
    type=click.Path(dir_okay=False),
    help="Read the CLIP weights from this file instead of the cache.",
)
@click.option(
    "--clip-x100",
    is_flag=True,
    help="CLIP score as mean(100 * max(cos, 0)) (torchmetrics) instead of BK-SDM's mean raw cosine.",
)
@click.option(
    "--fid-dims",
    default=2048,
    type=click.Choice(["64", "192", "768", "2048"]),
    callback=lambda ctx, param, value: int(value),
    help="Inception features for FID (pytorch-fid's --dims); the protocol uses pool3, 2048.",
)
@click.option("--is-splits", default=10, type=int, help="Inception Score splits (torch-fidelity's default).")
@click.option(
    "--family", default=None, help="Also compute the extra metrics registered for this model family."
)
@click.option(
    "--save-reference-stats",
    default=None,
    type=click.Path(dir_okay=False),
    help="Save the reference folder's FID statistics to this .npz.",
)
@click.option("--batch-size", default=50, type=int, help="Images per network call.")
@device_option()
@click.option(
    "--record",
    default=None,
    type=click.Path(dir_okay=False),
    help="Results JSON (default: IMAGES/eval-score.json).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def score_command(images, metric_list, record, as_json, **options):
    """Score generated images: FID (pytorch-fid), IS (torch-fidelity), CLIP score (open_clip).

    \b
    Example:
      distilsd eval score -i runs/tiny/im256 -r coco-val2014-256.npz -p metadata.csv
    """
    from distilsd.evaluate.records import make_record, write_record
    from distilsd.evaluate.score import score_images

    chosen = [name.strip().lower() for name in metric_list.split(",") if name.strip()]
    results = score_images(images, metrics_to_compute=chosen, **options)
    for note in results["notes"]:
        click.echo(f"note: {note}", err=True)
    settings = {"images": images, "metrics": chosen, **options}
    record_path = write_record(
        record or Path(images) / "eval-score.json", make_record("eval-score", settings, results)
    )
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for key in ("fid", "inception_score", "clip_score"):
            if key in results:
                click.echo(f"{key}: {results[key]:.4f}")
        for key, value in results.get("extra", {}).items():
            click.echo(f"{key}: {value:.4f}")
    click.echo(f"record: {record_path}", err=True)


@eval_group.command("sweep", context_settings={"show_default": True})
@click.option(
    "-m",
    "--model",
    "models",
    multiple=True,
    required=True,
    help="Model (repeatable): PIPELINE or PIPELINE::UNET (a student U-Net on a base pipeline; PIPELINE+UNET is the old spelling).",
)
@click.option(
    "-p",
    "--prompts",
    required=True,
    type=click.Path(dir_okay=False),
    help="Caption file: BK-SDM metadata.csv, .jsonl or .txt.",
)
@click.option(
    "-r",
    "--reference",
    required=True,
    type=click.Path(),
    help="FID reference: image folder or pytorch-fid .npz.",
)
@click.option(
    "-o",
    "--output-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Sweep folder: images per model and guidance, sweep.json/.md/.png.",
)
@click.option(
    "-g",
    "--guidance",
    "guidance_scales",
    default="1.5,2,3,4,5,6,7,8",
    help="Comma-separated guidance scales (the SD v1.5 card's sweep).",
)
@generation_options
@click.option("--metrics", "metric_list", default="fid,clip", help="Comma-separated: fid, is, clip.")
@click.option("--score-size", default=256, type=int, help="Scoring size (images are resized to it).")
@click.option(
    "--fid-dims",
    default=2048,
    type=click.Choice(["64", "192", "768", "2048"]),
    callback=lambda ctx, param, value: int(value),
    help="Inception features for FID (protocol: 2048).",
)
@click.option(
    "--inception-weights",
    default=None,
    type=click.Path(dir_okay=False),
    help="FID/IS Inception weights; default: torch hub's cache.",
)
@click.option("--clip-model", default="ViT-g-14", help="open_clip model name, or local-dir:FOLDER.")
@click.option("--clip-pretrained", default="laion2b_s34b_b88k", help="open_clip pretrained tag.")
@click.option(
    "--clip-weights",
    default=None,
    type=click.Path(dir_okay=False),
    help="CLIP weights file instead of the cache.",
)
@click.option("--clip-x100", is_flag=True, help="CLIP score as mean(100 * max(cos, 0)).")
@click.option("--no-plot", is_flag=True, help="Do not draw sweep.png (needs matplotlib).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def sweep_command(
    models,
    prompts,
    reference,
    output_dir,
    guidance_scales,
    metric_list,
    score_size,
    fid_dims,
    no_plot,
    quiet,
    **options,
):
    """Sweep guidance scales for several models: one FID/CLIP table and an FID-vs-CLIP plot.

    \b
    Example:
      distilsd eval sweep -m CompVis/stable-diffusion-v1-4 -m CompVis/stable-diffusion-v1-4+nota-ai/bk-sdm-tiny \\
          -p metadata.csv -r coco-val2014-256.npz -o runs/sweep --limit 1000
    """
    from distilsd.errors import InputError
    from distilsd.evaluate import sweep
    from distilsd.evaluate.records import make_record, write_record
    from distilsd.logging_utils import quiet_libraries

    try:
        scales = tuple(float(value) for value in guidance_scales.split(",") if value.strip())
    except ValueError:
        raise InputError(f"--guidance takes comma-separated numbers, got '{guidance_scales}'") from None
    clip_options = {
        key: options.pop(key)
        for key in ("inception_weights", "clip_model", "clip_pretrained", "clip_weights", "clip_x100")
    }
    settings = _eval_settings(options, 7.5)
    settings.generation_settings()
    specs = _read_captions(prompts, options)
    if not no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            from distilsd.errors import MissingDependencyError

            raise MissingDependencyError("matplotlib", "eval", "the sweep plot (or pass --no-plot)") from None
    quiet_libraries()
    score_options = {
        "metrics_to_compute": [m.strip() for m in metric_list.split(",") if m.strip()],
        "size": score_size,
        "fid_dims": fid_dims,
        **clip_options,
    }
    result = sweep.run_sweep(
        list(models),
        specs,
        output_dir,
        reference,
        guidance_scales=scales,
        settings=settings,
        score_options=score_options,
        device=options["device"],
        progress=not quiet,
    )
    if result is None:  # not the main process
        return
    output = Path(output_dir)
    table = sweep.markdown_table(result["rows"])
    (output / "sweep.md").write_text(table, encoding="utf-8")
    record_settings = {
        "models": list(models),
        "prompts": prompts,
        "reference": reference,
        "guidance_scales": scales,
        **options,
        **score_options,
    }
    write_record(output / "sweep.json", make_record("eval-sweep", record_settings, result))
    if not no_plot:
        sweep.fid_clip_plot(result["rows"], output / "sweep.png")
    click.echo(table, nl=False)
