"""Training a pipeline's VAE (``distilsd train --component vae``), for models built from scratch.

The loss is SD's autoencoder loss without its perceptual (LPIPS) and adversarial terms,
whose networks would have to be downloaded: ``L1 + mse_weight * MSE + kl_weight * KL``.
``vae.train_decoder_only`` fine-tunes the decoder of a trained VAE and leaves the latent
space alone, so a U-Net trained on the old latents works with the new decoder. At the
end the latent scaling factor is set to ``1 / std`` of the training latents, which is how
SD's 0.18215 was chosen, so the U-Net trained next sees unit-variance latents.

Same run-folder contract as the U-Net trainer: ``config.yaml``, ``logs/train.csv``,
atomic ``checkpoints/checkpoint-<step>/`` (``vae/``, optimizer, LR schedule, RNG, state),
``--resume latest``, and at the end a full pipeline (the base model's other components + the
trained ``vae/``).

``--component tiny-vae`` trains diffusers' ``AutoencoderTiny`` (TAESD) against the model's
VAE, as TAESD was trained: its decoder learns the VAE decoder's images from the same latents
(L1 + MSE), its encoder the VAE encoder's latent means (MSE), both in the U-Net's scaled
latent space (:mod:`distilsd.tiny_vae`). The VAE stays frozen. The run folder itself ends up
an ``AutoencoderTiny`` folder (``config.json``, weights, and the VAE it fits in
``distill_info.json``), which ``generate --vae RUN_DIR`` swaps in.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch

from distilsd.errors import InputError, OutputError

from . import checkpoint as ckpt
from .config import (
    TrainConfig,
    accelerate_mixed_precision,
    fingerprint,
    save_config,
    trajectory_fields,
)

logger = logging.getLogger(__name__)

LOSS_TERMS = {"vae": ("loss", "l1", "kl"), "tiny-vae": ("loss", "decoder_l1", "encoder_mse")}


def _columns(component: str) -> list[str]:
    return ["step", "epoch", *LOSS_TERMS[component], "lr", "grad_norm", "samples_per_s"]


def _random_windows(
    count: int, side: int, size: int, generator: torch.Generator, step: int = 1
) -> tuple[list[int], list[int]]:
    """``count`` random tops and lefts of a ``size`` window in a ``side`` image, multiples of ``step``."""
    positions = (side - size) // step + 1
    tops = (torch.randint(0, positions, (count,), generator=generator) * step).tolist()
    lefts = (torch.randint(0, positions, (count,), generator=generator) * step).tolist()
    return tops, lefts


def _crop(images: torch.Tensor, tops: list[int], lefts: list[int], size: int, scale: int = 1) -> torch.Tensor:
    """Each image's window at (top, left) / scale, ``size`` / scale wide: the same windows in latent space."""
    side = size // scale
    return torch.stack(
        [
            image[:, top // scale : top // scale + side, left // scale : left // scale + side]
            for image, top, left in zip(images, tops, lefts, strict=True)
        ]
    )


def _random_crop(pixels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random ``size`` x ``size`` window per image (from a seeded generator: resumable)."""
    if not size or size >= pixels.shape[-1]:
        return pixels
    tops, lefts = _random_windows(len(pixels), pixels.shape[-1], size, generator)
    return _crop(pixels, tops, lefts, size)


def train_vae(config: TrainConfig):
    """Train ``config.model``'s VAE (or a tiny VAE for it) on ``config.data``.

    The run folder ends up a full pipeline (``vae``) or a tiny VAE folder (``tiny-vae``).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from distilsd.models import load_component

    from .data import GlobalBatchSampler, ImageCaptionDataset, make_loader, open_source
    from .run_folder import COPIED_COMPONENTS, RunSummary

    if not config.output_dir:
        raise InputError("no output folder given", hint="pass -o RUN_DIR")
    if not config.model:
        raise InputError("no model given", hint="pass --model PIPELINE_DIR (its VAE is trained)")
    output_dir = Path(config.output_dir)
    resume_from = None
    if config.resume:
        resume_from = ckpt.find_checkpoint(config.resume, output_dir)
    elif output_dir.exists() and any(output_dir.iterdir()) and not config.overwrite:
        hint = (
            "continue it with --resume latest"
            if ckpt.list_checkpoints(output_dir)
            else "choose a new folder or pass --overwrite"
        )
        raise OutputError(f"output folder {output_dir} is not empty", hint=hint)

    accelerator = Accelerator(mixed_precision=accelerate_mixed_precision(config.mixed_precision))
    set_seed(config.seed)
    source = open_source(config.data)
    vae = load_component(AutoencoderKL, config.model, "vae", allow_pickle=config.allow_pickle, what="VAE")
    tiny = config.component == "tiny-vae"
    teacher_vae = None
    if tiny:
        teacher_vae = vae.eval().requires_grad_(False)
        vae = _new_tiny_vae(config, teacher_vae)
    elif config.init == "random":
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            vae = AutoencoderKL.from_config(vae.config)
            if config.vae.initial_logvar is not None:
                # quant_conv maps the encoder output to (mean, logvar); only its logvar half moves.
                latent = vae.config.latent_channels
                with torch.no_grad():
                    vae.quant_conv.weight[latent:] *= 0.01
                    vae.quant_conv.bias[latent:] = config.vae.initial_logvar
    if config.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    vae.train()
    trained_parameters = list(vae.parameters())
    if config.vae.train_decoder_only and not tiny:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
        vae.encoder.eval()
        trained_parameters = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    optim = config.optim
    optimizer = torch.optim.AdamW(
        trained_parameters,
        lr=optim.learning_rate,
        betas=(optim.adam_beta1, optim.adam_beta2),
        weight_decay=optim.weight_decay,
        eps=optim.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        {"constant": "constant_with_warmup"}.get(optim.lr_scheduler, optim.lr_scheduler),
        optimizer=optimizer,
        num_warmup_steps=optim.lr_warmup_steps,
        num_training_steps=config.max_steps,
    )
    model, optimizer = accelerator.prepare(vae, optimizer)
    if teacher_vae is not None:
        teacher_vae.to(accelerator.device)
    dataset = ImageCaptionDataset(
        source,
        config.data.resolution,
        config.data.crop,
        config.data.random_flip,
        config.seed,
        caption_choice=config.data.caption_choice,
        resize=config.data.resize,
    )
    global_batch = config.train_batch_size * accelerator.num_processes

    global_step = 0
    if resume_from is not None:
        ckpt.check_resume_config(resume_from, config)
        from safetensors.torch import load_file

        accelerator.unwrap_model(model).load_state_dict(
            load_file(str(resume_from / "vae" / "diffusion_pytorch_model.safetensors"))
        )
        optimizer.load_state_dict(
            torch.load(resume_from / "optimizer.pt", map_location="cpu", weights_only=True)
        )
        lr_scheduler.load_state_dict(torch.load(resume_from / "lr_scheduler.pt", weights_only=False))
        global_step = ckpt.read_state(resume_from)["global_step"]
        logger.info("resumed from %s at step %d", resume_from, global_step)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
    csv_file = None
    if accelerator.is_main_process and "csv" in config.log_with:
        logs = output_dir / "logs"
        logs.mkdir(exist_ok=True)
        path = logs / "train.csv"
        rows = []
        if path.is_file() and global_step:
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= global_step]
        with open(path.with_suffix(".csv.tmp"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=_columns(config.component))
            writer.writeheader()
            writer.writerows(rows)
        path.with_suffix(".csv.tmp").replace(path)
        csv_file = open(path, "a", newline="")
        csv_writer = csv.DictWriter(csv_file, fieldnames=_columns(config.component))

    def save_checkpoint(step: int) -> None:
        if not accelerator.is_main_process:
            return
        tmp = ckpt.temp_checkpoint_dir(output_dir, step)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            accelerator.unwrap_model(model).save_pretrained(tmp / "vae", safe_serialization=True)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
            state = {
                "global_step": step,
                "train_batch_size": config.train_batch_size,
                "num_processes": accelerator.num_processes,
                "config_fingerprint": fingerprint(config),
                "trajectory": trajectory_fields(config),
            }
            (tmp / ckpt.STATE_FILE).write_text(json.dumps(state, indent=1, default=str))
            ckpt.commit_checkpoint(tmp, config.keep_checkpoints)
        except ckpt.WRITE_ERRORS as exc:
            error = ckpt.as_os_error(exc, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            raise ckpt.describe_save_error(error, step, output_dir) from exc

    summary = RunSummary(output_dir, config.max_steps)
    loader = make_loader(
        dataset,
        GlobalBatchSampler(
            len(dataset),
            global_batch,
            accelerator.process_index,
            config.train_batch_size,
            config.seed,
            start=global_step * config.gradient_accumulation_steps,
        ),
        config.data.num_workers,
    )
    batches = iter(loader)
    batches_per_epoch = max(1, len(dataset) // global_batch)
    progress = tqdm(
        total=config.max_steps,
        initial=global_step,
        desc="train vae",
        disable=not (accelerator.is_local_main_process and config.progress_bar),
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    try:
        while global_step < config.max_steps:
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + global_step)
            totals = dict.fromkeys(LOSS_TERMS[config.component], 0.0)
            for _ in range(config.gradient_accumulation_steps):
                batch = next(batches)
                if tiny:  # crops are taken after the teacher has seen the whole image
                    pixels = batch["pixel_values"].to(accelerator.device)
                    terms = _tiny_vae_loss(model, teacher_vae, pixels, generator, config, accelerator)
                else:
                    pixels = _random_crop(batch["pixel_values"], config.vae.crop_size, generator)
                    terms = _vae_loss(model, pixels.to(accelerator.device), generator, config, accelerator)
                accelerator.backward(terms["loss"] / config.gradient_accumulation_steps)
                for key, value in terms.items():
                    totals[key] += float(value.detach()) / config.gradient_accumulation_steps
            if not math.isfinite(totals["loss"]):
                raise InputError(
                    f"the VAE loss is not finite at step {global_step + 1}",
                    hint="lower the learning rate and --resume from the last checkpoint",
                )
            grad_norm = float("nan")
            if optim.max_grad_norm > 0:
                grad_norm = float(accelerator.clip_grad_norm_(trained_parameters, optim.max_grad_norm))
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{totals['loss']:.4f}", refresh=False)
            if global_step % config.log_every == 0 or global_step == config.max_steps:
                elapsed = time.perf_counter() - started
                row = {
                    "step": global_step,
                    "epoch": round(global_step * config.gradient_accumulation_steps / batches_per_epoch, 4),
                    **{k: f"{v:.6g}" for k, v in totals.items()},
                    "lr": f"{lr_scheduler.get_last_lr()[0]:.6g}",
                    "grad_norm": f"{grad_norm:.4g}",
                    "samples_per_s": f"{global_batch * config.gradient_accumulation_steps * config.log_every / max(elapsed, 1e-9):.4g}",
                }
                summary.losses.append({k: float(v) if k != "step" else v for k, v in row.items()})
                if csv_file is not None:
                    csv_writer.writerow(row)
                    csv_file.flush()
                started = time.perf_counter()
            if config.checkpoint_every and global_step % config.checkpoint_every == 0:
                save_checkpoint(global_step)
        progress.close()
        last = ckpt.list_checkpoints(output_dir)
        if not last or last[-1][0] != global_step:
            save_checkpoint(global_step)

        trained = accelerator.unwrap_model(model)
        trained.eval()
        if tiny:
            if accelerator.is_main_process:
                _write_tiny_vae(trained, teacher_vae, output_dir, global_step, config.model)
            summary.steps = global_step
            summary.is_main_process = accelerator.is_main_process
            return summary
        # Scaling factor: 1 / std of the latents of the first images of the data (kept when
        # only the decoder was trained: the latents are the same).
        count = min(config.vae.scaling_samples, len(dataset))
        with torch.no_grad():
            latents = []
            for start in range(0, count, 64):
                pixels = torch.stack(
                    [dataset[(0, i)]["pixel_values"] for i in range(start, min(count, start + 64))]
                )
                latents.append(trained.encode(pixels.to(accelerator.device)).latent_dist.mean.float().cpu())
            std = float(torch.cat(latents).std())
        if config.vae.train_decoder_only:
            # The frozen encoder's latents are what the U-Net learned: keep their scaling factor.
            logger.info("latent std over %d images: %.4f (scaling_factor kept at %.5f)", count, std,
                        trained.config.scaling_factor)  # fmt: skip
        else:
            trained.register_to_config(scaling_factor=1.0 / std)
            logger.info("latent std over %d images: %.4f -> scaling_factor %.5f", count, std, 1.0 / std)
        if accelerator.is_main_process:
            _write_pipeline(config.model, trained, output_dir, COPIED_COMPONENTS, global_step, std)
    finally:
        if csv_file is not None:
            csv_file.close()
        accelerator.end_training()
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()
    summary.steps = global_step
    summary.is_main_process = accelerator.is_main_process
    return summary


def _vae_loss(model, pixels, generator, config: TrainConfig, accelerator) -> dict[str, torch.Tensor]:
    """SD's autoencoder loss minus LPIPS and GAN: L1 (+ MSE) + KL."""
    with accelerator.autocast(), torch.set_grad_enabled(not config.vae.train_decoder_only):
        posterior = model.encode(pixels).latent_dist
    with accelerator.autocast():
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(
            pixels.device
        )
        reconstruction = model.decode(latents).sample
    l1 = (reconstruction.float() - pixels).abs().mean()
    kl = posterior.kl().mean() / pixels[0].numel()  # per pixel value, like the L1
    mse = (reconstruction.float() - pixels).pow(2).mean()
    loss = l1 + config.vae.mse_weight * mse + config.vae.kl_weight * kl
    if config.vae.edge_weight:
        loss = loss + config.vae.edge_weight * edge_l1(reconstruction.float(), pixels)
    return {"loss": loss, "l1": l1, "kl": kl}


def edge_l1(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L1 between the images' and the targets' neighbour differences (across and down).

    The gradient-difference loss of Mathieu et al. (2016): per-pixel L1/MSE is content with a
    blurred edge, which costs little area; this term charges for every step in the edge, so
    thin parts (a star's points, a cross's arms) stay sharp.
    """
    across = (images[..., :, 1:] - images[..., :, :-1]) - (targets[..., :, 1:] - targets[..., :, :-1])
    down = (images[..., 1:, :] - images[..., :-1, :]) - (targets[..., 1:, :] - targets[..., :-1, :])
    return across.abs().mean() + down.abs().mean()


def tiny_vae_targets(teacher_vae, pixels, generator, crop_size: int = 0, autocast=contextlib.nullcontext):
    """What a tiny VAE learns from ``teacher_vae``: (pixels, latents, target images, target latents).

    TAESD's targets: the frozen VAE's decoded images (of posterior samples, as the U-Net's
    latents are, not only the means) and its encoder's scaled latent means. With ``crop_size``
    the teacher still encodes and decodes the whole image and the tiny VAE gets a window of it
    (aligned to the latent grid): the teacher's attention and group norms see the whole image,
    so its round trip of a crop is not the crop of its round trip (3-4.5 levels apart on the
    Shapes VAE, more than the tiny decoder's whole error).
    """
    scaling = teacher_vae.config.scaling_factor
    shift = teacher_vae.config.get("shift_factor") or 0.0
    with torch.no_grad(), autocast():
        posterior = teacher_vae.encode(pixels).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(pixels.device)
        latents = posterior.mean + posterior.std * noise
        target_images = teacher_vae.decode(latents).sample.float().clamp(-1, 1)
    latents = (latents.float() - shift) * scaling
    target_latents = (posterior.mean.float() - shift) * scaling
    if crop_size and crop_size < pixels.shape[-1]:
        factor = pixels.shape[-1] // latents.shape[-1]
        tops, lefts = _random_windows(len(pixels), pixels.shape[-1], crop_size, generator, step=factor)
        pixels, target_images = (
            _crop(pixels, tops, lefts, crop_size),
            _crop(target_images, tops, lefts, crop_size),
        )
        latents = _crop(latents, tops, lefts, crop_size, scale=factor)
        target_latents = _crop(target_latents, tops, lefts, crop_size, scale=factor)
    return pixels, latents, target_images, target_latents


def _tiny_vae_loss(model, teacher_vae, pixels, generator, config, accelerator) -> dict[str, torch.Tensor]:
    """L1 (+ MSE, + edges) to the teacher's images, MSE to its latents: see ``tiny_vae_targets``."""
    pixels, latents, target_images, target_latents = tiny_vae_targets(
        teacher_vae, pixels, generator, config.vae.crop_size, accelerator.autocast
    )
    with accelerator.autocast():
        images = model.decode(latents).sample
        encoded = model.encode(pixels).latents
    decoder_l1 = (images.float() - target_images).abs().mean()
    decoder_mse = (images.float() - target_images).pow(2).mean()
    encoder_mse = (encoded.float() - target_latents).pow(2).mean()
    loss = decoder_l1 + config.vae.mse_weight * decoder_mse + config.vae.encoder_weight * encoder_mse
    if config.vae.edge_weight:
        loss = loss + config.vae.edge_weight * edge_l1(images.float(), target_images)
    return {"loss": loss, "decoder_l1": decoder_l1, "encoder_mse": encoder_mse}


def _new_tiny_vae(config: TrainConfig, teacher_vae):
    """The tiny VAE to train: ``config.student``'s (fine-tuning one) or a new one shaped for the VAE."""
    from diffusers import AutoencoderTiny

    from distilsd.tiny_vae import check_tiny_vae_fits, load_tiny_vae, tiny_vae_config, vae_signature

    if config.student:
        model = load_tiny_vae(config.student)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            model = AutoencoderTiny.from_config(
                tiny_vae_config(dict(teacher_vae.config), config.vae.tiny_channels, config.vae.tiny_blocks)
            )
    check_tiny_vae_fits(model, teacher_vae, vae_signature(teacher_vae), config.student or "(new)")
    return model


def _write_tiny_vae(tiny, teacher_vae, output_dir: Path, steps: int, model: str) -> None:
    """The run folder as an ``AutoencoderTiny`` folder, each file replaced atomically."""
    from distilsd.tiny_vae import INFO_FILE, vae_signature

    staging = output_dir / ".tiny_vae.tmp"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        tiny.save_pretrained(staging, safe_serialization=True)
        info = {
            "trained": "tiny-vae",
            "steps": steps,
            "model": model,
            "teacher_vae": vae_signature(teacher_vae),
        }
        (staging / INFO_FILE).write_text(json.dumps(info, indent=1))
        for item in staging.iterdir():
            item.replace(output_dir / item.name)
        staging.rmdir()
    except OSError as exc:
        raise OutputError(f"could not write the tiny VAE into {output_dir}: {exc.strerror or exc}") from None


def _write_pipeline(model: str, vae, output_dir: Path, components, steps: int, latent_std: float) -> None:
    """The base model's folder with ``vae/`` replaced, each part written atomically."""
    source = Path(model)
    if not (source / "model_index.json").is_file():
        raise InputError(
            f"{model} is not a local diffusers pipeline folder",
            hint="VAE training needs a local pipeline folder as --model",
        )

    def atomic_dir(name: str, write) -> None:
        ckpt.atomic_dir(output_dir, name, write)

    try:
        for name in (*components, "unet"):
            if name != "vae" and (source / name).is_dir():
                atomic_dir(name, lambda d, name=name: shutil.copytree(source / name, d))
        atomic_dir("vae", lambda d: vae.save_pretrained(d, safe_serialization=True))
        shutil.copy2(source / "model_index.json", output_dir / ".model_index.json.tmp")
        (output_dir / ".model_index.json.tmp").replace(output_dir / "model_index.json")
        info = {"trained": "vae", "steps": steps, "model": model, "latent_std": latent_std}
        (output_dir / ".distill_info.json.tmp").write_text(json.dumps(info, indent=1))
        (output_dir / ".distill_info.json.tmp").replace(output_dir / "distill_info.json")
    except ckpt.WRITE_ERRORS as exc:
        raise ckpt.describe_pipeline_error(exc, output_dir) from exc
