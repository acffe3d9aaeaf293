"""``distilsd distill``, ``distilsd train`` and ``distilsd bench-train``: thin adapters over the trainer.

Values come from defaults, then ``--config FILE`` (YAML), then ``key=value`` arguments
(``optim.learning_rate=1e-4``), then the flags; a flag that is not given leaves the value
from the file alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

# flag parameter name -> config key
FLAG_KEYS = {
    "output_dir": "output_dir",
    "teacher": "teacher",
    "model": "model",
    "arch": "arch",
    "student": "student",
    "init": "init",
    "data": "data.source",
    "data_format": "data.format",
    "image_column": "data.image_column",
    "caption_column": "data.caption_column",
    "split": "data.split",
    "resolution": "data.resolution",
    "crop": "data.crop",
    "random_flip": "data.random_flip",
    "max_samples": "data.max_samples",
    "num_workers": "data.num_workers",
    "cache_latents": "data.cache_latents",
    "cache_dir": "data.cache_dir",
    "caption_dropout": "data.caption_dropout",
    "batch_size": "train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "max_steps": "max_steps",
    "learning_rate": "optim.learning_rate",
    "lr_scheduler": "optim.lr_scheduler",
    "lr_warmup_steps": "optim.lr_warmup_steps",
    "max_grad_norm": "optim.max_grad_norm",
    "optimizer": "optim.optimizer",
    "ema": "optim.ema",
    "ema_decay": "optim.ema_decay",
    "mixed_precision": "mixed_precision",
    "gradient_checkpointing": "gradient_checkpointing",
    "compile": "compile",
    "seed": "seed",
    "l_task": "loss.l_task",
    "l_out": "loss.l_out",
    "l_feat": "loss.l_feat",
    "feature_norm": "loss.feature_norm",
    "snr_gamma": "loss.snr_gamma",
    "noise_offset": "loss.noise_offset",
    "timestep_sampling": "loss.timestep_sampling",
    "logit_mean": "loss.logit_mean",
    "logit_std": "loss.logit_std",
    "prediction_type": "loss.prediction_type",
    "checkpoint_every": "checkpoint_every",
    "keep_checkpoints": "keep_checkpoints",
    "resume": "resume",
    "overwrite": "overwrite",
    "validation_prompt": "validation.prompts",
    "validation_every": "validation.every",
    "log_with": "log_with",
    "nan_policy": "nan_policy",
    "final_weights": "final_weights",
    "progress": "progress_bar",
    "component": "component",
    "train_text_encoder": "train_text_encoder",
}


def _common_options(func):
    """Options shared by `distill` and `train` (applied bottom-up, listed top-down in --help)."""
    options = [
        click.option(
            "-c",
            "--config",
            "config_file",
            type=click.Path(path_type=Path),
            help="YAML config file, or a shipped recipe: bk-sdm-tiny, segmind-small, ofa-three-stage, shapes-* (the Shapes model). Flags and key=value arguments override it.",
        ),
        click.option(
            "-o", "--output-dir", help="Run folder: logs, checkpoints, and at the end the trained pipeline."
        ),
        click.option(
            "--student",
            help="Start from this student U-Net folder (diffusers format) instead of building one.",
        ),
        click.option(
            "--init",
            type=click.Choice(["teacher", "random"]),
            default=None,
            help="Student weights: copied from the model (default) or random (train from scratch).",
        ),
        click.option(
            "--data",
            help="Image folder with metadata.jsonl, Hugging Face dataset (name or path), or webdataset .tar shards.",
        ),
        click.option(
            "--data-format",
            type=click.Choice(["auto", "imagefolder", "hf", "webdataset"]),
            default=None,
            help="Force the data format (default: detected).",
        ),
        click.option(
            "--image-column",
            help="HF dataset image column, or webdataset image extension(s) (default: image).",
        ),
        click.option(
            "--caption-column",
            help="metadata.jsonl key, HF column or webdataset extension of the captions (default: text).",
        ),
        click.option("--split", help="HF dataset split (default: train)."),
        click.option("--resolution", type=int, help="Training resolution in pixels (default: 512)."),
        click.option(
            "--crop",
            type=click.Choice(["center", "random"]),
            default=None,
            help="Square crop after resizing the short side (default: center).",
        ),
        click.option(
            "--random-flip/--no-random-flip", default=None, help="Mirror half of the images (default: on)."
        ),
        click.option("--max-samples", type=int, help="Use only the first N samples."),
        click.option("--num-workers", type=int, help="DataLoader processes that decode images (default: 0)."),
        click.option(
            "--cache-latents/--no-cache-latents",
            default=None,
            help="Encode images and captions once, keep them on disk, reuse across epochs and runs "
            "(with --train-text-encoder only the images; captions are encoded as training goes).",
        ),
        click.option(
            "--cache-dir",
            help="Where the latent cache lives (default: $DISTILSD_CACHE/latents, ~/.cache/distilsd/latents).",
        ),
        click.option(
            "--caption-dropout",
            type=float,
            help="Fraction of captions replaced by the empty prompt, for classifier-free guidance (SD: 0.1; default: 0).",
        ),
        click.option("--batch-size", type=int, help="Batch size per process (default: 1)."),
        click.option(
            "--gradient-accumulation-steps",
            "--grad-accum",
            type=int,
            help="Micro-batches per optimizer step (default: 1).",
        ),
        click.option("--max-steps", type=int, help="Optimizer steps to train (default: 1000)."),
        click.option(
            "--learning-rate", "--lr", type=float, help="AdamW learning rate (default: 5e-5, BK-SDM)."
        ),
        click.option(
            "--lr-scheduler",
            type=click.Choice(["constant", "cosine", "linear"]),
            default=None,
            help="After warmup (default: constant).",
        ),
        click.option("--lr-warmup-steps", type=int, help="Linear warmup steps (default: 0)."),
        click.option("--max-grad-norm", type=float, help="Clip the gradient norm (default: 1.0; 0 = off)."),
        click.option(
            "--optimizer",
            type=click.Choice(["auto", "adamw", "adamw8bit"]),
            default=None,
            help="auto = 8-bit AdamW when bitsandbytes works on this GPU, else AdamW.",
        ),
        click.option("--ema/--no-ema", default=None, help="Keep an EMA of the student (default: on)."),
        click.option("--ema-decay", type=float, help="EMA decay (default: 0.9999)."),
        click.option(
            "--mixed-precision",
            type=click.Choice(["fp32", "fp16", "bf16", "no"]),
            default=None,
            help="Mixed precision (default: fp32, none; 'no' is the old spelling of fp32).",
        ),
        click.option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            default=None,
            help="Trade compute for memory.",
        ),
        click.option("--compile/--no-compile", default=None, help="torch.compile the student."),
        click.option("--seed", type=int, help="Seed of data order, noise and timesteps (default: 0)."),
        click.option(
            "--snr-gamma", type=float, help="Min-SNR weighting of the task term (e.g. 5.0; default: off)."
        ),
        click.option("--noise-offset", type=float, help="Noise offset (e.g. 0.05; default: 0)."),
        click.option(
            "--timestep-sampling",
            type=click.Choice(["uniform", "logit_normal"]),
            default=None,
            help="Noise levels to train on: uniform (default) or logit_normal (SD3; see --logit-mean).",
        ),
        click.option(
            "--logit-mean", type=float, help="logit_normal: centre, 0 = the middle timestep (default: 0)."
        ),
        click.option("--logit-std", type=float, help="logit_normal: spread (default: 1)."),
        click.option(
            "--prediction-type",
            type=click.Choice(["epsilon", "v_prediction"]),
            default=None,
            help="Override the model scheduler's prediction type.",
        ),
        click.option(
            "--checkpoint-every",
            type=int,
            help="Save a checkpoint every N steps (default: 500; 0 = only at the end).",
        ),
        click.option("--keep-checkpoints", type=int, help="Keep the newest K checkpoints (default: 3)."),
        click.option(
            "--resume", help="'latest' (newest checkpoint of the output folder) or a checkpoint folder."
        ),
        click.option(
            "--overwrite",
            is_flag=True,
            default=None,
            help="Use an output folder that already holds something.",
        ),
        click.option(
            "--validation-prompt", multiple=True, help="Prompt for the validation grids (repeatable)."
        ),
        click.option(
            "--validation-every",
            type=int,
            help="Write a validation grid every N steps (default: at the end only).",
        ),
        click.option(
            "--log-with",
            multiple=True,
            type=click.Choice(["csv", "tensorboard", "wandb"]),
            help="Loggers (repeatable; default: csv + tensorboard).",
        ),
        click.option(
            "--nan-policy",
            type=click.Choice(["stop", "skip"]),
            default=None,
            help="On a NaN/inf loss: stop (default) or skip the step.",
        ),
        click.option(
            "--final-weights",
            type=click.Choice(["ema", "raw"]),
            default=None,
            help="Which weights the output pipeline's unet/ holds (default: ema).",
        ),
        click.option("--progress/--no-progress", default=None, help="Show the progress bar."),
        click.argument("overrides", nargs=-1),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _kd_options(func):
    for option in reversed(
        [
            click.option(
                "--teacher",
                help="Teacher pipeline folder (or hub id); also the source of VAE, text encoder and tokenizer.",
            ),
            click.option(
                "--model",
                help="Pipeline that provides VAE, text encoder, tokenizer and scheduler (default: the teacher).",
            ),
            click.option(
                "--arch",
                help="Student layout: bk-base, bk-small, bk-tiny, or a layout spec file (see `distilsd compress`).",
            ),
            click.option("--l-task", type=float, help="Weight of the task loss (default: 1)."),
            click.option("--l-out", type=float, help="Weight of the output KD loss (default: 1)."),
            click.option("--l-feat", type=float, help="Weight of the feature KD loss (default: 1)."),
            click.option(
                "--feature-norm",
                type=click.Choice(["none", "teacher"]),
                default=None,
                help="teacher: divide each layer's feature loss by the teacher feature's mean square.",
            ),
        ]
    ):
        func = option(func)
    return func


def _resolve_config(config_file: Path | None, overrides: tuple[str, ...], flags: dict[str, Any], base=None):
    from distilsd.distill.config import load_config, parse_overrides

    values = parse_overrides(overrides)
    for name, value in flags.items():
        if value is None or name not in FLAG_KEYS:
            continue
        if isinstance(value, tuple):
            if not value:
                continue
            value = list(value)
        values[FLAG_KEYS[name]] = value
    return load_config(config_file, values, base=base)


def _run(config) -> None:
    import logging

    from distilsd.cli import quiet_libraries
    from distilsd.distill.run import run_training

    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("distilsd",):
        logging.getLogger(name).setLevel(logging.INFO)
    summary = run_training(config)
    if summary is not None and summary.is_main_process:
        last = summary.losses[-1] if summary.losses else {}
        terms = ", ".join(f"{k}={last[k]:.4g}" for k in ("loss", "task", "out_kd", "feat_kd") if k in last)
        losses = f" ({terms})" if terms else ""
        click.echo(f"trained {summary.steps} steps{losses}; pipeline in {summary.output_dir}")
        if summary.bad_samples or summary.skipped_steps:
            click.echo(
                f"skipped {summary.bad_samples} bad samples and {summary.skipped_steps} non-finite steps",
                err=True,
            )


@click.command("distill", context_settings={"ignore_unknown_options": False})
@_kd_options
@_common_options
def distill_command(config_file: Path | None, overrides: tuple[str, ...], **flags: Any) -> None:
    """Distill a teacher into a block-removed student (task + output KD + feature KD).

    \b
    Example:
      distilsd distill --teacher ./sd-v1-5 --arch bk-tiny --data ./laion-subset \\
          -o runs/bk-tiny --max-steps 50000 --batch-size 64 --grad-accum 4 --mixed-precision fp16
    Multi-GPU / multi-node: the same command after `accelerate launch --multi_gpu --num_processes N -m`
    (or `torchrun --nproc_per_node N -m`); --batch-size is per process. Extra settings as key=value,
    e.g. `optim.ema_decay=0.999 loss.feature_pairs=...`, or in a YAML --config.
    The output folder ends up a full pipeline; its unet/ holds the EMA weights by default.
    """
    config = _resolve_config(config_file, overrides, flags)
    if not config.teacher and not config.stages:
        from distilsd.errors import InputError

        raise InputError(
            "distill needs a teacher",
            hint="pass --teacher MODEL, or use `distilsd train` to train without one",
        )
    _run(config)


@click.command("train")
@click.option(
    "--model",
    help="Pipeline to fine-tune (its U-Net), and the source of VAE, text encoder, tokenizer and scheduler.",
)
@click.option(
    "--arch",
    help="Train a block-removed student of the model's U-Net (no KD baseline): bk-base, bk-small, bk-tiny or a spec file.",
)
@click.option(
    "--component",
    type=click.Choice(["unet", "vae"]),
    default=None,
    help="What to train: the U-Net (default) or the VAE (L1 + KL; sets the latent scaling factor).",
)
@click.option(
    "--train-text-encoder/--no-train-text-encoder",
    default=None,
    help="Train the text encoder together with the U-Net (models trained from scratch).",
)
@_common_options
def train_command(config_file: Path | None, overrides: tuple[str, ...], **flags: Any) -> None:
    """Train or fine-tune an SD U-Net without a teacher (task loss only).

    \b
    Example:
      distilsd train --model ./sd-v1-5 --data ./pokemon -o runs/ft --max-steps 2000
      distilsd train --model ./sd-v1-5 --init random --data ./shapes -o runs/shapes
      distilsd train -c shapes-vae --model runs/shapes-init -o runs/shapes-vae
    """
    from distilsd.distill.config import TrainConfig

    base = TrainConfig()
    base.loss.l_out = 0.0
    base.loss.l_feat = 0.0
    config = _resolve_config(config_file, overrides, flags, base=base)
    if config.teacher:
        from distilsd.errors import InputError

        raise InputError(
            "train does not use a teacher",
            hint="use `distilsd distill --teacher ...` for knowledge distillation",
        )
    if not config.model:
        from distilsd.errors import InputError

        raise InputError(
            "no model given",
            hint="pass --model PIPELINE_DIR (its VAE, text encoder and U-Net config are used)",
        )
    _run(config)


@click.command("bench-train")
@click.option(
    "--teacher", help="Teacher pipeline (default: a tiny random SD pipeline built in a temp folder)."
)
@click.option("--arch", default="bk-tiny", show_default=True, help="Student layout.")
@click.option("--data", help="Training data (default: synthetic shapes images in a temp folder).")
@click.option(
    "--num-images",
    default=64,
    show_default=True,
    help="Synthetic images to generate when --data is not given.",
)
@click.option("--resolution", default=64, show_default=True, help="Training resolution in pixels.")
@click.option("--batch-size", default=8, show_default=True, help="Batch size.")
@click.option("--steps", default=20, show_default=True, help="Timed steps per mode (after one warm-up step).")
@click.option(
    "--mixed-precision", type=click.Choice(["fp32", "fp16", "bf16", "no"]), default="fp32", show_default=True
)
@click.option("--num-workers", default=0, show_default=True, help="DataLoader workers for the uncached run.")
def bench_train_command(
    teacher, arch, data, num_images, resolution, batch_size, steps, mixed_precision, num_workers
) -> None:
    """Training throughput (samples/s) without and with the latent cache, side by side."""
    from distilsd.cli import quiet_libraries
    from distilsd.distill.bench import benchmark_training, format_benchmark

    quiet_libraries()
    result = benchmark_training(
        teacher=teacher,
        arch=arch,
        data=data,
        num_images=num_images,
        resolution=resolution,
        batch_size=batch_size,
        steps=steps,
        mixed_precision=mixed_precision,
        num_workers=num_workers,
    )
    click.echo(format_benchmark(result))
