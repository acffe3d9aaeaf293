"""``distilsd distill``, ``distilsd train`` and ``distilsd bench-train``: thin adapters over the trainer.

Values come from defaults, then ``--config FILE`` (YAML), then ``key=value`` arguments
(``optim.learning_rate=1e-4``), then the flags; a flag that is not given leaves the value
from the file alone.

The flags are generated from :data:`FLAGS`, one row per flag naming the config field it
sets: the type, the choices (:data:`distilsd.distill.config.CHOICES`) and the default shown
in ``--help`` come from the :class:`~distilsd.distill.config.TrainConfig` dataclasses, so
they cannot drift apart. tests/distill/test_cli_flags.py fails when a config field has
neither a flag nor a place in :data:`NO_FLAG`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from distilsd.cli.options import FINITE_FLOAT
from distilsd.distill.config import CHOICES, OLD_PRECISION_CHOICES, TrainConfig

BOTH = ("distill", "train")
DISTILL = ("distill",)
TRAIN = ("train",)


@dataclass(frozen=True)
class Flag:
    """One flag of ``distill`` / ``train`` and the config field it sets."""

    key: str  # dotted config key, e.g. "optim.learning_rate"
    names: tuple[str, ...]  # "--max-steps", "-o", "--ema/--no-ema" (a bool field's on/off pair)
    help: str
    # The default in words, for a field whose default value (None, "") says nothing by itself.
    default_text: str | None = None
    commands: tuple[str, ...] = BOTH


FLAGS: tuple[Flag, ...] = (
    Flag("teacher", ("--teacher",), "Teacher pipeline folder (or hub id); also the source of VAE, text encoder and tokenizer.", commands=DISTILL),
    Flag("model", ("--model",), "Pipeline that provides VAE, text encoder, tokenizer and scheduler.", "the teacher", DISTILL),
    Flag("model", ("--model",), "Pipeline to fine-tune (its U-Net), and the source of VAE, text encoder, tokenizer and scheduler.", commands=TRAIN),
    Flag("arch", ("--arch",), "Student layout: bk-base, bk-small, bk-tiny, or a layout spec file (see `distilsd compress`).", commands=DISTILL),
    Flag("arch", ("--arch",), "Train a block-removed student of the model's U-Net (no KD baseline): bk-base, bk-small, bk-tiny or a spec file.", commands=TRAIN),
    Flag("component", ("--component",), "What to train: the U-Net, the VAE (L1 + KL; sets the latent scaling factor), or a tiny VAE (TAESD) for the model's VAE.", commands=TRAIN),
    Flag("train_text_encoder", ("--train-text-encoder/--no-train-text-encoder",), "Train the text encoder together with the U-Net (models trained from scratch).", commands=TRAIN),
    Flag("lora.rank", ("--lora-rank",), "Train peft LoRA adapters of this rank instead of the weights; the run folder gets pytorch_lora_weights.safetensors (EMA off unless --ema).", "off"),
    Flag("lora.alpha", ("--lora-alpha",), "LoRA alpha: the adapter is scaled by alpha / rank.", "the rank"),
    Flag("lora.targets", ("--lora-targets",), "Modules that get adapters, by name or name suffix (repeatable)."),
    Flag("lora.text_encoder", ("--train-text-encoder-lora/--no-train-text-encoder-lora",), "Adapters on the text encoder too (its q/k/v/out projections).", commands=TRAIN),
    Flag("lora.token_embeddings", ("--train-token-embedding",), "Also train the input token embedding of this word (repeatable; needs --lora-rank): pivotal tuning, written as embeddings/WORD.safetensors.", commands=TRAIN),
    Flag("lora.token_embedding_lr", ("--token-embedding-lr",), "Learning rate of the trained token embeddings.", "the LoRA's", TRAIN),
    Flag("lora.token_embedding_steps", ("--token-embedding-steps",), "Two phases: train only the token embeddings for this many steps, then only the adapters with the embeddings frozen.", "both together", TRAIN),
    Flag("lora.kohya", ("--kohya/--no-kohya",), "Also write the adapter in the kohya / AUTOMATIC1111 layout (lora_kohya.safetensors)."),
    Flag("method", ("--method",), "kd: task + output + feature KD (BK-SDM); lcm: latent consistency distillation, a student that samples in 1-8 steps with the LCM scheduler (docs/lcm.md).", commands=DISTILL),
    Flag("lcm.num_ddim_timesteps", ("--num-ddim-timesteps",), "LCM: steps N of the teacher's skipping-step DDIM solver (each skips 1000/N timesteps).", commands=DISTILL),
    Flag("lcm.guidance_min", ("--guidance-min",), "LCM: smallest guidance scale (as `generate -g`) the student learns.", commands=DISTILL),
    Flag("lcm.guidance_max", ("--guidance-max",), "LCM: largest guidance scale the student learns.", commands=DISTILL),
    Flag("lcm.loss_type", ("--lcm-loss",), "LCM: consistency loss, pseudo-Huber or MSE.", commands=DISTILL),
    Flag("lcm.huber_c", ("--huber-c",), "LCM: the pseudo-Huber loss's c.", commands=DISTILL),
    Flag("lcm.target_ema_decay", ("--target-ema-decay",), "LCM: EMA rate of the target network (not used with --lora-rank).", commands=DISTILL),
    Flag("loss.l_task", ("--l-task",), "Weight of the task loss.", commands=DISTILL),
    Flag("loss.l_out", ("--l-out",), "Weight of the output KD loss.", commands=DISTILL),
    Flag("loss.l_feat", ("--l-feat",), "Weight of the feature KD loss.", commands=DISTILL),
    Flag("loss.feature_norm", ("--feature-norm",), "teacher: divide each layer's feature loss by the teacher feature's mean square.", commands=DISTILL),
    Flag("output_dir", ("-o", "--output-dir"), "Run folder: logs, checkpoints, and at the end the trained pipeline."),
    Flag("student", ("--student",), "Start from this student U-Net folder (diffusers format) instead of building one."),
    Flag("init", ("--init",), "Student weights: copied from the model (teacher) or random (train from scratch)."),
    Flag("data.source", ("--data",), "Image folder with metadata.jsonl, Hugging Face dataset (name or path), or webdataset .tar shards."),
    Flag("data.format", ("--data-format",), "Data format; auto: detected from the source."),
    Flag("data.image_column", ("--image-column",), "HF dataset image column, or webdataset image extension(s)."),
    Flag("data.caption_column", ("--caption-column",), "metadata.jsonl key, HF column or webdataset extension of the captions."),
    Flag("data.split", ("--split",), "HF dataset split."),
    Flag("data.resolution", ("--resolution",), "Training resolution in pixels (default: the model's own, e.g. 64 for the Shapes models; 512 where it cannot be read)."),
    Flag("data.crop", ("--crop",), "Square crop after resizing the short side."),
    Flag("data.random_flip", ("--random-flip/--no-random-flip",), "Mirror half of the images."),
    Flag("data.resize", ("--resize",), "Resize filter: bilinear (BK-SDM's torchvision Resize) or bicubic (distilsd's earlier rule)."),
    Flag("data.caption_choice", ("--caption-choice",), "Rows with several captions: a seeded random one each epoch (BK-SDM) or always the first."),
    Flag("data.max_samples", ("--max-samples",), "Use only the first N samples."),
    Flag("data.num_workers", ("--num-workers",), "DataLoader processes that decode images."),
    Flag("data.cache_latents", ("--cache-latents/--no-cache-latents",), "Encode images and captions once, keep them on disk, reuse across epochs and runs (with --train-text-encoder only the images; captions are encoded as training goes)."),
    Flag("data.refine_latents", ("--refine-latents",), "Decoder-inversion steps for each image's latent, so that it decodes to the image (rows marked \"prior\": true stay as encoded); for small sets such as DreamBooth's."),
    Flag("data.cache_dir", ("--cache-dir",), "Where the latent cache lives.", "$DISTILSD_CACHE/latents, ~/.cache/distilsd/latents"),
    Flag("data.caption_dropout", ("--caption-dropout",), "Fraction of captions replaced by the empty prompt, for classifier-free guidance (SD: 0.1)."),
    Flag("train_batch_size", ("--batch-size",), "Batch size per process."),
    Flag("gradient_accumulation_steps", ("--gradient-accumulation-steps", "--grad-accum"), "Micro-batches per optimizer step."),
    Flag("max_steps", ("--max-steps",), "Optimizer steps to train."),
    Flag("optim.learning_rate", ("--learning-rate", "--lr"), "AdamW learning rate (the default is BK-SDM's)."),
    Flag("optim.lr_scheduler", ("--lr-scheduler",), "Learning-rate schedule after the warmup."),
    Flag("optim.lr_warmup_steps", ("--lr-warmup-steps",), "Linear warmup steps."),
    Flag("optim.max_grad_norm", ("--max-grad-norm",), "Clip the gradient norm (0 = off)."),
    Flag("optim.optimizer", ("--optimizer",), "auto = 8-bit AdamW when bitsandbytes works on this GPU, else AdamW."),
    Flag("optim.ema", ("--ema/--no-ema",), "Keep an EMA of the student (off by default with --lora-rank and --method lcm)."),
    Flag("optim.ema_decay", ("--ema-decay",), "EMA decay."),
    Flag("mixed_precision", ("--mixed-precision",), "Mixed precision."),
    Flag("gradient_checkpointing", ("--gradient-checkpointing/--no-gradient-checkpointing",), "Trade compute for memory."),
    Flag("compile", ("--compile/--no-compile",), "torch.compile the student."),
    Flag("compile_backend", ("--compile-backend",), "torch.compile backend with --compile (default inductor; e.g. aot_eager, openvino)."),
    Flag("seed", ("--seed",), "Seed of data order, noise and timesteps."),
    Flag("loss.snr_gamma", ("--snr-gamma",), "Min-SNR weighting of the task term (e.g. 5.0).", "off"),
    Flag("loss.noise_offset", ("--noise-offset",), "Noise offset (e.g. 0.05)."),
    Flag("loss.timestep_sampling", ("--timestep-sampling",), "Noise levels to train on: uniform, or logit_normal (SD3; see --logit-mean)."),
    Flag("loss.logit_mean", ("--logit-mean",), "logit_normal: centre, 0 = the middle timestep."),
    Flag("loss.logit_std", ("--logit-std",), "logit_normal: spread."),
    Flag("loss.prediction_type", ("--prediction-type",), "Override the model scheduler's prediction type.", "the scheduler's"),
    Flag("loss.prior_target", ("--prior-target",), "What rows marked \"prior\": true learn: noise (the task target) or base (the model's prediction with its LoRA off)."),
    Flag("checkpoint_every", ("--checkpoint-every",), "Save a checkpoint every N steps (0 = only at the end)."),
    Flag("keep_checkpoints", ("--keep-checkpoints",), "Keep the newest K checkpoints."),
    Flag("resume", ("--resume",), "'latest' (newest checkpoint of the output folder) or a checkpoint folder."),
    Flag("overwrite", ("--overwrite",), "Use an output folder that already holds something."),
    Flag("allow_pickle", ("--allow-pickle",), "Allow models whose weights are only pickled .bin files (unpickling can run code: only for files you trust)."),
    Flag("validation.prompts", ("--validation-prompt",), "Prompt for the validation grids (repeatable)."),
    Flag("validation.every", ("--validation-every",), "Write a validation grid every N steps (0 = at the end only)."),
    Flag("log_with", ("--log-with",), "Loggers (repeatable)."),
    Flag("nan_policy", ("--nan-policy",), "On a NaN/inf loss: stop, or skip the step."),
    Flag("final_weights", ("--final-weights",), "Which weights the output pipeline's unet/ holds."),
    Flag("progress_bar", ("--progress/--no-progress",), "Show the progress bar."),
)  # fmt: skip

# Config fields without a flag, and why; they are set in a YAML --config or as key=value.
NO_FLAG: dict[str, str] = {
    "data.cache_dtype": "storage detail of the latent cache",
    "data.cache_shard_size": "storage detail of the latent cache",
    "loss.feature_pairs": "a list of [teacher, student] module pairs: YAML or key=value syntax",
    "optim.adam_beta1": "AdamW constants, rarely changed",
    "optim.adam_beta2": "AdamW constants, rarely changed",
    "optim.weight_decay": "AdamW constants, rarely changed",
    "optim.adam_epsilon": "AdamW constants, rarely changed",
    "validation.num_inference_steps": "how the validation grids are sampled",
    "validation.guidance_scale": "how the validation grids are sampled",
    "validation.seed": "how the validation grids are sampled",
    "vae.kl_weight": "component: vae settings, set by the shapes-vae recipes",
    "vae.mse_weight": "component: vae settings, set by the shapes-vae recipes",
    "vae.edge_weight": "component: vae / tiny-vae settings, set as key=value (vae.edge_weight=1)",
    "vae.crop_size": "component: vae settings, set by the shapes-vae recipes",
    "vae.scaling_samples": "component: vae settings, set by the shapes-vae recipes",
    "vae.initial_logvar": "component: vae settings, set by the shapes-vae recipes",
    "vae.train_decoder_only": "component: vae settings, set by the shapes-vae recipes",
    "lora.dropout": "LoRA dropout, rarely used for diffusion adapters",
    "lora.text_encoder_targets": "which text-encoder modules get adapters: YAML or key=value",
    "vae.tiny_channels": "component: tiny-vae settings, set by the shapes-tiny-vae recipe",
    "vae.tiny_blocks": "component: tiny-vae settings, set by the shapes-tiny-vae recipe",
    "vae.encoder_weight": "component: tiny-vae settings, set by the shapes-tiny-vae recipe",
    "allow_tf32": "on by default; off only to debug numerics",
    "lcm.timestep_scaling": "LCM boundary-condition constant (LCMScheduler's 10), rarely changed",
    "lcm.time_cond_proj_dim": "LCM guidance embedding size (diffusers' 256), rarely changed",
    "lcm.inference_steps": "the LCM result's default sampling steps: key=value",
    "log_every": "the csv log is cheap; key=value for sparser logs",
    "stages": "a list of partial configs: only in YAML",
    "name": "the name of a stage: only in YAML stages",
}
# Fields one command leaves out because they contradict it.
NO_FLAG_IN: dict[str, dict[str, str]] = {
    "distill": {
        "component": "a VAE is trained without a teacher (`train --component vae`)",
        "train_text_encoder": "the teacher's text embeddings must stay fixed",
        "lora.text_encoder": "the teacher's text embeddings must stay fixed",
        "lora.token_embeddings": "the teacher's text embeddings must stay fixed",
        "lora.token_embedding_lr": "the teacher's text embeddings must stay fixed",
        "lora.token_embedding_steps": "the teacher's text embeddings must stay fixed",
    },
    "train": {
        "teacher": "train has no teacher",
        "loss.l_task": "without a teacher the loss is the task loss alone",
        "loss.l_out": "without a teacher there is no output KD",
        "loss.l_feat": "without a teacher there is no feature KD",
        "loss.feature_norm": "without a teacher there is no feature KD",
        "method": "both methods distill a teacher",
        "lcm.num_ddim_timesteps": "LCM distillation needs a teacher",
        "lcm.guidance_min": "LCM distillation needs a teacher",
        "lcm.guidance_max": "LCM distillation needs a teacher",
        "lcm.loss_type": "LCM distillation needs a teacher",
        "lcm.huber_c": "LCM distillation needs a teacher",
        "lcm.target_ema_decay": "LCM distillation needs a teacher",
    },
}


def param_name(key: str) -> str:
    """The Python name click gives a flag's value: the config key with "." as "__"."""
    return key.replace(".", "__")


def config_key(name: str) -> str:
    """The config key a flag's Python name stands for (the inverse of :func:`param_name`)."""
    return name.replace("__", ".")


def field_defaults() -> dict[str, tuple[Any, Any]]:
    """Dotted config key -> (default value, type annotation), from the dataclasses."""
    return dict(_fields(TrainConfig, ""))


def _fields(cls: type, prefix: str):
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        tp = hints[item.name]
        if dataclasses.is_dataclass(tp):
            yield from _fields(tp, f"{prefix}{item.name}.")
        else:
            default = (
                item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
            )
            yield f"{prefix}{item.name}", (default, tp)


def format_default(value: Any) -> str | None:
    """A default as --help shows it; None when the value says nothing (None, "", [])."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        mantissa, e, exponent = f"{value:g}".partition("e")
        return f"{mantissa}e{int(exponent)}" if e else mantissa
    if isinstance(value, list):
        return ", ".join(f'"{v}"' if " " in str(v) else str(v) for v in value) if value else None
    return str(value)


def _click_type(tp: Any) -> tuple[Any, bool]:
    """(click type, is a list) of a field annotation such as ``int | None`` or ``list[str]``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is list:
        return _click_type(args[0])[0], True
    if args:  # X | None
        return _click_type(args[0])
    return {int: click.INT, float: FINITE_FLOAT, bool: click.BOOL}.get(tp, click.STRING), False


def _option(flag: Flag, default: Any, tp: Any):
    click_type, multiple = _click_type(tp)
    if flag.key in CHOICES:
        # Old precision spellings (mixed precision "no") are still taken, and normalised with a warning.
        click_type = click.Choice(CHOICES[flag.key] + OLD_PRECISION_CHOICES.get(flag.key, ()))
    shown = flag.default_text or format_default(default)
    is_plain_flag = click_type is click.BOOL and not any("/" in name for name in flag.names)
    # The default goes into the help text as click's show_default would print it: click's own
    # cannot be used, since every flag's default is None (a flag not given leaves the value
    # from --config alone).
    help_text = f"{flag.help}  [default: {shown}]" if shown and not is_plain_flag else flag.help
    kwargs: dict[str, Any] = {"help": help_text}
    if click_type is click.BOOL:
        kwargs.update(default=None, is_flag=True)
    elif multiple:
        kwargs.update(type=click_type, multiple=True)
    else:
        kwargs.update(type=click_type, default=None)
    return click.option(*flag.names, param_name(flag.key), **kwargs)


def config_options(command: str):
    """--config, the command's FLAGS (in table order) and the trailing key=value arguments."""
    defaults = field_defaults()
    options = [
        click.option(
            "-c",
            "--config",
            "config_file",
            type=click.Path(path_type=Path),
            help="YAML config file, or a shipped recipe: bk-sdm-tiny, segmind-small, ofa-three-stage, shapes-* (the Shapes model). Flags and key=value arguments override it.",
        ),
        *(_option(flag, *defaults[flag.key]) for flag in FLAGS if command in flag.commands),
        click.argument("overrides", nargs=-1),
    ]

    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _resolve_config(config_file: Path | None, overrides: tuple[str, ...], flags: dict[str, Any], base=None):
    from distilsd.distill.config import load_config, parse_overrides
    from distilsd.errors import InputError

    values = parse_overrides(overrides)
    for name, value in flags.items():
        if value is None:
            continue
        if isinstance(value, tuple):
            if not value:
                continue
            value = list(value)
        values[config_key(name)] = value
    try:
        return load_config(config_file, values, base=base)
    except InputError as exc:
        raise InputError(_name_flags(exc.message, flags), exc.hint) from None


def _name_flags(message: str, flags: dict[str, Any]) -> str:
    """Add the flag the user typed after each config key it set: 'optim.learning_rate (--lr)'."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return message
    options = {param.name: "/".join(param.opts) for param in ctx.command.params}
    for name, value in flags.items():
        if value is None or value == () or name not in options:
            continue
        key = config_key(name)
        message = re.sub(rf"(?<![\w.]){re.escape(key)}(?=[ :])", f"{key} ({options[name]})", message)
    return message


def _run(config) -> None:
    from distilsd.distill.run import run_training
    from distilsd.logging_utils import quiet_libraries

    quiet_libraries()
    summary = run_training(config)
    if summary is not None and summary.is_main_process:
        last = summary.losses[-1] if summary.losses else {}
        terms = ", ".join(f"{k}={last[k]:.4g}" for k in ("loss", "task", "out_kd", "feat_kd") if k in last)
        losses = f" ({terms})" if terms else ""
        what = "LoRA" if config.lora.rank is not None else "pipeline"
        click.echo(f"trained {summary.steps} steps{losses}; {what} in {summary.output_dir}")
        if summary.bad_samples or summary.skipped_steps:
            click.echo(
                f"skipped {summary.bad_samples} bad samples and {summary.skipped_steps} non-finite steps",
                err=True,
            )


@click.command("distill", context_settings={"ignore_unknown_options": False})
@config_options("distill")
def distill_command(config_file: Path | None, overrides: tuple[str, ...], **flags: Any) -> None:
    """Distill a teacher into a block-removed student (task + output KD + feature KD),
    or (--method lcm) into a latent consistency model that samples in 1-8 steps.

    \b
    Example:
      distilsd distill --teacher ./sd-v1-5 --arch bk-tiny --data ./laion-subset \\
          -o runs/bk-tiny --max-steps 50000 --batch-size 64 --grad-accum 4 --mixed-precision fp16
      distilsd distill -c shapes-tiny-lcm           # LCM: sample it with `generate -m runs/shapes/tiny-lcm`
      distilsd distill --method lcm --teacher shapes --data DATA --lora-rank 16 -o runs/lcm-lora
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
@config_options("train")
def train_command(config_file: Path | None, overrides: tuple[str, ...], **flags: Any) -> None:
    """Train or fine-tune an SD U-Net without a teacher (task loss only).

    \b
    Example:
      distilsd train --model ./sd-v1-5 --data ./pokemon -o runs/ft --max-steps 2000
      distilsd train --model ./sd-v1-5 --init random --data ./shapes -o runs/shapes
      distilsd train -c shapes-vae --model runs/shapes-init -o runs/shapes-vae
      distilsd train --model shapes-tiny --data ./hexagons -o runs/hex-lora --lora-rank 8 --max-steps 400
    """
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
    type=click.IntRange(min=1),
    show_default=True,
    help="Synthetic images to generate when --data is not given.",
)
@click.option(
    "--resolution",
    default=64,
    type=click.IntRange(min=8),
    show_default=True,
    help="Training resolution in pixels.",
)
@click.option("--batch-size", default=8, type=click.IntRange(min=1), show_default=True, help="Batch size.")
@click.option(
    "--steps",
    default=20,
    type=click.IntRange(min=1),
    show_default=True,
    help="Timed steps per mode (after one warm-up step).",
)
@click.option(
    "--mixed-precision",
    type=click.Choice(CHOICES["mixed_precision"] + OLD_PRECISION_CHOICES["mixed_precision"]),
    default="fp32",
    show_default=True,
)
@click.option(
    "--num-workers",
    default=0,
    type=click.IntRange(min=0),
    show_default=True,
    help="DataLoader workers for the uncached run.",
)
@click.option(
    "--lora-rank",
    type=click.IntRange(min=1),
    default=None,
    help="Personalisation mode: LoRA (this rank) and full DreamBooth steps/s of --teacher and its student.",
)
@click.option(
    "--student",
    default=None,
    help="Personalisation mode: the student (U-Net or pipeline folder; default: --arch of the teacher).",
)
def bench_train_command(
    teacher,
    arch,
    data,
    num_images,
    resolution,
    batch_size,
    steps,
    mixed_precision,
    num_workers,
    lora_rank,
    student,
) -> None:
    """Training throughput (samples/s) without and with the latent cache, side by side.

    With --lora-rank: LoRA and DreamBooth training steps/s of a teacher and its student.

    \b
    Example:
      distilsd bench-train --teacher shapes --student shapes-tiny --lora-rank 8 --batch-size 4
    """
    from distilsd.distill.bench import benchmark_training, format_benchmark
    from distilsd.logging_utils import get_verbosity, quiet_libraries, set_verbosity

    quiet_libraries()
    if get_verbosity() == logging.INFO:
        # The trainer's info lines are about the benchmark's throw-away runs in a temp folder.
        set_verbosity(logging.WARNING)
    common = dict(
        arch=arch,
        data=data,
        num_images=num_images,
        resolution=resolution,
        batch_size=batch_size,
        steps=steps,
        mixed_precision=mixed_precision,
    )
    if lora_rank is not None:
        from distilsd.distill.bench import benchmark_personalisation, format_personalisation
        from distilsd.errors import InputError

        if teacher is None:
            raise InputError("--lora-rank measures a given model", hint="pass --teacher MODEL (e.g. shapes)")
        result = benchmark_personalisation(teacher, student=student, lora_rank=lora_rank, **common)
        click.echo(format_personalisation(result))
        return
    result = benchmark_training(teacher=teacher, num_workers=num_workers, **common)
    click.echo(format_benchmark(result))
