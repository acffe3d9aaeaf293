"""A short adaptation run after ``lora transfer``: the student's LoRA learns what teacher + LoRA predict.

:func:`distilsd.lora.transfer.transfer_lora` copies each adapter onto the student module the
compression copied its layer to; the student's other layers differ from the teacher's, so the
copied adapter is a starting point, not the answer. Here the student + LoRA (initialised from
the transferred adapter, only its LoRA parameters trained) learns to match the teacher + LoRA's
noise prediction on noised latents of the instance images, captioned with the instance prompt
(or their own captions): BK-SDM's output distillation (the trainer's ``output_kd_loss``),
applied to the adapter alone.

This is a plain loop rather than a trainer run: the trainer adds fresh adapters and takes its
teacher as a model without a LoRA; hosting this would mean a teacher-LoRA and an
adapter-from-file path through the trainer for a run of a few hundred steps on a dozen images.
It reuses the trainer's pieces: the image preparation (``distill.data.prepare_image``), the
timestep draw and the KD loss (``distill.losses``), the DreamBooth caption reading, and
``save``'s diffusers layout.

Text-encoder adapters are not trained: the student shares its teacher's text encoder, so the
transferred text-encoder adapter is the teacher's own, and the prompts are encoded once by the
teacher's text encoder with it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distilsd.errors import InputError

from .names import LORA_WEIGHTS

logger = logging.getLogger(__name__)

PROBE_SAMPLES = 8  # noised latents the KD loss is measured on before and after (fixed noise and timesteps)


@dataclass
class AdaptationReport:
    steps: int
    images: int
    kd_loss_before: float  # on the fixed probe batch, with the transferred adapter
    kd_loss_after: float  # on the same batch, after the run
    seconds: float
    step_losses: list[float] = field(default_factory=list)  # each step's batch (noisier)

    def to_json(self) -> dict:
        return asdict(self)


def adapt_transferred_lora(
    teacher: str,
    teacher_lora: str | Path,
    student: str,
    output_dir: str | Path,
    *,
    data: str | Path,
    prompt: str,
    steps: int,
    learning_rate: float = 1e-4,
    batch_size: int = 2,
    resolution: int | None = None,
    seed: int = 0,
    device: str = "auto",
    allow_pickle: bool = False,
) -> AdaptationReport:
    """Train the LoRA that :func:`transfer_lora` wrote into ``output_dir`` for ``steps`` steps; rewrite it."""
    import torch
    from diffusers import DDPMScheduler
    from PIL import Image
    from safetensors.torch import save_file

    from distilsd.distill.data import prepare_image
    from distilsd.distill.losses import output_kd_loss, sample_timesteps
    from distilsd.models import load_torch_pipeline, load_unet

    from .adapters import adapter_tensors
    from .dreambooth import read_instance_images
    from .files import LoRASpec, apply_loras, read_lora

    if steps < 1:
        raise InputError(f"--steps {steps} must be >= 1")
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size} must be >= 1")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise InputError(f"--learning-rate {learning_rate} must be a positive number")
    if not prompt.strip():
        raise InputError("the adaptation run needs the instance prompt", hint='give --prompt "a sks hexagon"')
    output_dir = Path(output_dir)
    student_file = output_dir / LORA_WEIGHTS
    images = read_instance_images(data, prompt, set())
    started = time.perf_counter()

    loaded = load_torch_pipeline(teacher, device=device, safety_checker=False, allow_pickle=allow_pickle)
    pipe = loaded.pipeline
    torch_device = loaded.device
    # The teacher's LoRA folded in: teacher + LoRA is the target, and it needs no gradients.
    apply_loras(pipe, [LoRASpec(Path(teacher_lora))], fuse=True, allow_pickle=allow_pickle)
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.requires_grad_(False).eval()

    student_unet = load_unet(student, allow_pickle=allow_pickle).to(torch_device)
    student_unet.requires_grad_(False)
    tensors, metadata = read_lora(student_file)
    unet_tensors = {key: value for key, value in tensors.items() if key.startswith("unet.")}
    has_config = any(key.startswith("unet.") for key in metadata)
    # diffusers builds the peft config from the metadata's "unet.*" keys (rank, alpha, targets),
    # or, without them, from the ranks in the tensors.
    student_unet.load_lora_adapter(
        unet_tensors, prefix="unet", adapter_name="default", metadata=metadata if has_config else None
    )
    trained = [p for name, p in student_unet.named_parameters() if "lora_" in name]
    for parameter in trained:
        parameter.requires_grad_(True)
    student_unet.train()

    size = resolution or loaded.native_resolution
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pixels = torch.stack(
            [prepare_image(Image.open(image.path).convert("RGB"), size, "center", False) for image in images]
        ).to(torch_device)
        posterior = pipe.vae.encode(pixels).latent_dist
        means, stds = posterior.mean.cpu(), posterior.std.cpu()
        captions = [image.caption for image in images]
        embeddings = pipe.encode_prompt(captions, torch_device, 1, False)[0]
    scaling = pipe.vae.config.scaling_factor
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    num_timesteps = noise_scheduler.config.num_train_timesteps

    def batch(indices: torch.Tensor, draw: torch.Generator):
        latents = (
            means[indices] + stds[indices] * torch.randn(means[indices].shape, generator=draw)
        ) * scaling
        noise = torch.randn(latents.shape, generator=draw)
        timesteps = sample_timesteps("uniform", num_timesteps, len(indices), draw)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        return noisy.to(torch_device), timesteps.to(torch_device), embeddings[indices.to(torch_device)]

    def kd_loss(noisy, timesteps, text) -> torch.Tensor:
        with torch.no_grad():
            target = pipe.unet(noisy, timesteps, text, return_dict=False)[0]
        return output_kd_loss(student_unet(noisy, timesteps, text, return_dict=False)[0], target)

    probe_draw = torch.Generator().manual_seed(seed + 1)
    probe = batch(torch.arange(PROBE_SAMPLES) % len(images), probe_draw)
    with torch.no_grad():
        before = float(kd_loss(*probe))
    optimizer = torch.optim.AdamW(trained, lr=learning_rate, weight_decay=0.0)
    losses = []
    for step in range(steps):
        indices = torch.randint(0, len(images), (batch_size,), generator=generator)
        loss = kd_loss(*batch(indices, generator))
        if not torch.isfinite(loss):
            raise InputError(f"the KD loss is {float(loss)} at step {step + 1}", hint="lower --learning-rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(round(float(loss.detach()), 6))
        logger.info("adaptation step %d/%d: KD loss %.5f", step + 1, steps, losses[-1])
    student_unet.eval()
    with torch.no_grad():
        after = float(kd_loss(*probe))

    adapted = {f"unet.{key}": value for key, value in adapter_tensors(student_unet).items()}
    missing = sorted(set(unet_tensors) - set(adapted))
    if missing:  # would mean the key layouts disagree; never write a half adapter
        raise InputError(
            f"the adapted LoRA lacks {len(missing)} tensors of the transferred one (first: {missing[0]})"
        )
    out = {**{k: v for k, v in tensors.items() if not k.startswith("unet.")}, **adapted}
    tmp = output_dir / f".{LORA_WEIGHTS}.tmp"
    file_metadata = {"format": "pt"}
    if metadata:
        file_metadata["lora_adapter_metadata"] = json.dumps(metadata)
    save_file(out, str(tmp), metadata=file_metadata)
    tmp.replace(student_file)
    report = AdaptationReport(
        steps=steps,
        images=len(images),
        kd_loss_before=before,
        kd_loss_after=after,
        seconds=round(time.perf_counter() - started, 2),
        step_losses=losses,
    )
    record_path = output_dir / "lora_transfer.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record["adaptation"] = {
        **report.to_json(),
        "teacher": str(teacher),
        "data": str(data),
        "prompt": prompt,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "resolution": size,
        "seed": seed,
    }
    tmp_record = output_dir / ".lora_transfer.json.tmp"
    tmp_record.write_text(json.dumps(record, indent=1))
    tmp_record.replace(record_path)
    return report
