"""Generating images with a loaded pipeline: planning, batching, writing, resuming.

The denoising itself is diffusers' (``pipeline(...)``); this module decides which images
to make, gives each a seed and a predictable file name, writes each PNG atomically with
its parameters embedded, and skips the ones a previous run already wrote.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distilsd import __version__
from distilsd.errors import InputError, OutputError
from distilsd.generate.metadata import (
    a1111_parameters,
    jpeg_with_parameters,
    png_with_parameters,
    read_image_parameters,
)
from distilsd.generate.prompts import MAX_SEED, PromptSpec, truncation_warnings
from distilsd.models import LoadedPipeline
from distilsd.schedulers import scheduler_label

logger = logging.getLogger(__name__)

MIN_SIZE = 64
MAX_SIZE = 2048
MAX_STEPS = 1000
IMAGE_FORMATS = {"png": ".png", "jpeg": ".jpg"}  # format -> file suffix


@dataclass
class GenerationSettings:
    """Settings shared by every image of a run (diffusers' argument names)."""

    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    height: int | None = None  # None: the model's native size (or the init image's)
    width: int | None = None
    negative_prompt: str = ""
    seed: int = 0  # image k of a prompt uses seed + k
    num_images_per_prompt: int = 1
    batch_size: int = 1
    strength: float = 0.8  # image-to-image and inpainting only
    image_format: str = "png"  # or "jpeg" (quality 75, parameters in the EXIF UserComment)

    def validate(self) -> None:
        """Check every value before any weights are loaded; the message names the flag."""
        for name, value in (("width", self.width), ("height", self.height)):
            if value is None:
                continue
            if value % 8 != 0:
                raise InputError(
                    f"--{name} {value} is not a multiple of 8",
                    hint=f"try --{name} {max(MIN_SIZE, value // 8 * 8)}",
                )
            if not MIN_SIZE <= value <= MAX_SIZE:
                raise InputError(f"--{name} {value} is outside {MIN_SIZE}..{MAX_SIZE} pixels")
        if not 1 <= self.num_inference_steps <= MAX_STEPS:
            raise InputError(f"--steps {self.num_inference_steps} must be between 1 and {MAX_STEPS}")
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise InputError(
                f"--guidance {self.guidance_scale} must be a finite number >= 0",
                hint="1 turns classifier-free guidance off; 7.5 is SD's default",
            )
        if not 0 <= self.seed <= MAX_SEED - max(self.num_images_per_prompt - 1, 0):
            raise InputError(
                f"--seed {self.seed} must be between 0 and {MAX_SEED}"
                + (" less --num-images - 1" if self.num_images_per_prompt > 1 else "")
            )
        if self.num_images_per_prompt < 1:
            raise InputError(f"--num-images {self.num_images_per_prompt} must be >= 1")
        if self.batch_size < 1:
            raise InputError(f"--batch-size {self.batch_size} must be >= 1")
        if not 0.0 < self.strength <= 1.0:
            raise InputError(f"--strength {self.strength} must be in (0, 1]")
        if self.image_format not in IMAGE_FORMATS:
            raise InputError(f"image format '{self.image_format}' is not one of: {', '.join(IMAGE_FORMATS)}")


@dataclass
class ImageJob:
    """One image to make: what goes into the pipeline and where the PNG goes."""

    prompt: str
    negative_prompt: str
    seed: int
    filename: str
    prompt_index: int
    image_index: int


@dataclass
class ImageRecord:
    """One image of a run, as reported by ``--json``."""

    path: str
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    model: str
    skipped: bool = False  # already written by an earlier run with the same parameters
    nsfw: bool = False  # the safety checker flagged it (diffusers blacks such images out)
    extra: dict[str, Any] = field(default_factory=dict)


def slugify(text: str, max_length: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "image"


def plan_jobs(prompts: list[PromptSpec], settings: GenerationSettings) -> list[ImageJob]:
    """Expand prompts into images with seeds and file names that do not depend on batching."""
    jobs = []
    suffix = IMAGE_FORMATS[settings.image_format]
    for p, spec in enumerate(prompts):
        base_seed = settings.seed if spec.seed is None else spec.seed
        negative = settings.negative_prompt if spec.negative_prompt is None else spec.negative_prompt
        for k in range(settings.num_images_per_prompt):
            if spec.name:
                stem = spec.name if settings.num_images_per_prompt == 1 else f"{spec.name}-{k:02d}"
            else:
                stem = f"{p:05d}-{k:02d}-{slugify(spec.prompt)}"
            jobs.append(ImageJob(spec.prompt, negative, base_seed + k, stem + suffix, p, k))
    return jobs


def check_output_dir(output_dir: Path) -> None:
    """Refuse an output folder that cannot be made or written, without making it.

    The folder is created with its first image (:func:`save_png_atomically`), so a run that
    fails before that leaves nothing behind.
    """
    existing = Path(output_dir).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        reason = "Not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = "Permission denied"
    else:
        return
    raise OutputError(
        f"cannot write to the output folder {output_dir}: {reason} ({existing})",
        hint="choose another --output-dir",
    )


def save_png_atomically(image, path: Path, parameters: str) -> None:
    """Write ``image`` with its ``parameters`` to a temp file, then rename it into place.

    PNG, or JPEG when ``path`` ends in .jpg / .jpeg. A run killed mid-write leaves no
    partial image behind under the final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    is_jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(
            jpeg_with_parameters(image, parameters) if is_jpeg else png_with_parameters(image, parameters)
        )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_image(path: str | Path, mode: str, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{what} {path} cannot be read as an image ({exc})") from None


def prepare_init_images(
    settings: GenerationSettings, init_image: str | Path | None, mask: str | Path | None
) -> tuple[Any, Any]:
    """Read the init image (and mask), fixing the output size from the init image if not set.

    A mask must have the init image's size: it is refused otherwise, since a silently
    stretched mask would repaint the wrong region. Both are then resized to the output size.
    """
    from PIL import Image

    if init_image is None:
        if mask is not None:
            raise InputError("--mask needs --init-image (the image to inpaint)")
        return None, None
    image = load_image(init_image, "RGB", "init image")
    mask_image = load_image(mask, "L", "mask") if mask is not None else None
    if mask_image is not None and mask_image.size != image.size:
        raise InputError(
            f"the mask is {mask_image.size[0]}x{mask_image.size[1]} but the init image is {image.size[0]}x{image.size[1]}; refusing to stretch it",
            hint="give a mask of the init image's size",
        )
    if settings.width is None:
        settings.width = max(MIN_SIZE, min(MAX_SIZE, image.size[0] // 8 * 8))
    if settings.height is None:
        settings.height = max(MIN_SIZE, min(MAX_SIZE, image.size[1] // 8 * 8))
    size = (settings.width, settings.height)
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
        if mask_image is not None:
            mask_image = mask_image.resize(size, Image.Resampling.NEAREST)
    return image, mask_image


def pipeline_arguments(
    prompts: list[str],
    negative_prompts: list[str],
    seeds: list[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    width: int,
    height: int,
    init_image: Any = None,
    mask_image: Any = None,
    strength: float = 0.8,
) -> dict[str, Any]:
    """The keyword arguments of one diffusers pipeline call that makes one image per seed.

    Each image gets its own CPU generator seeded with its seed, so an image does not depend
    on the batch it is in nor on the device. With ``init_image`` the call is image-to-image
    (the init image's size, already resized by :func:`prepare_init_images`), with
    ``mask_image`` too inpainting.
    """
    import torch

    call: dict[str, Any] = {
        "prompt": list(prompts),
        "negative_prompt": list(negative_prompts),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds],
    }
    if init_image is None:
        call.update(height=height, width=width)
    else:
        call.update(image=[init_image] * len(seeds), strength=strength)
        if mask_image is not None:
            call.update(mask_image=[mask_image] * len(seeds), height=height, width=width)
    return call


def generate_images(
    loaded: LoadedPipeline,
    jobs: list[ImageJob],
    settings: GenerationSettings,
    output_dir: str | Path,
    *,
    init_image: Any = None,
    mask_image: Any = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[ImageRecord]:
    """Make every image of ``jobs`` that is not already in ``output_dir``; return a record per job.

    An existing PNG whose embedded parameters equal the ones this run would write is
    skipped (so an interrupted batch resumes); one with other parameters is refused unless
    ``overwrite``. Images are produced ``settings.batch_size`` at a time; each has its own
    CPU generator seeded with its seed, so an image does not depend on the batch it was in
    (up to float rounding in batched kernels).
    """
    import torch
    from tqdm.auto import tqdm

    pipe = loaded.pipeline
    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    default_width, default_height = loaded.default_size
    width, height = settings.width or default_width, settings.height or default_height
    scheduler_name, sampler = scheduler_label(loaded.pipeline.scheduler)
    is_img2img = init_image is not None
    strength = settings.strength if is_img2img else None

    def parameters_of(job: ImageJob) -> str:
        extra = {"Mask": "yes"} if mask_image is not None else None
        return a1111_parameters(
            job.prompt, job.negative_prompt, steps=settings.num_inference_steps, sampler=sampler,
            cfg_scale=settings.guidance_scale, seed=job.seed, width=width, height=height,
            model=loaded.name, version=f"distilsd {__version__}", denoising_strength=strength, extra=extra,
        )  # fmt: skip

    def record_of(job: ImageJob, skipped: bool, nsfw: bool = False) -> ImageRecord:
        return ImageRecord(
            path=str(output_dir / job.filename), prompt=job.prompt, negative_prompt=job.negative_prompt, seed=job.seed,
            width=width, height=height, steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
            scheduler=scheduler_name, model=loaded.name, skipped=skipped, nsfw=nsfw,
            extra={"strength": strength} if is_img2img else {},
        )  # fmt: skip

    records: dict[int, ImageRecord] = {}
    todo: list[tuple[int, ImageJob]] = []
    for index, job in enumerate(jobs):
        path = output_dir / job.filename
        if path.exists():
            if read_image_parameters(path) == parameters_of(job):
                records[index] = record_of(job, skipped=True)
                continue
            if not overwrite:
                raise OutputError(
                    f"{path} exists and was made with other parameters",
                    hint="use another --output-dir, or --overwrite to replace it",
                )
        todo.append((index, job))

    texts = [text for _, job in todo for text in (job.prompt, job.negative_prompt)]
    for warning in truncation_warnings(getattr(pipe, "tokenizer", None), texts):
        logger.warning("%s", warning)
    pipe.set_progress_bar_config(disable=not progress, leave=False, desc="steps")
    bar = tqdm(
        total=len(jobs),
        initial=len(jobs) - len(todo),
        desc="images",
        unit="img",
        disable=not progress,
        file=sys.stderr,
    )
    try:
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start : start + settings.batch_size]
            call = pipeline_arguments(
                [job.prompt for _, job in batch], [job.negative_prompt for _, job in batch],
                [job.seed for _, job in batch], num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale, width=width, height=height,
                init_image=init_image, mask_image=mask_image, strength=settings.strength,
            )  # fmt: skip
            with torch.inference_mode():
                output = pipe(**call)
            flags = getattr(output, "nsfw_content_detected", None) or [False] * len(batch)
            for (index, job), image, nsfw in zip(batch, output.images, flags):
                save_png_atomically(image, output_dir / job.filename, parameters_of(job))
                records[index] = record_of(job, skipped=False, nsfw=bool(nsfw))
                if nsfw:
                    logger.warning("the safety checker flagged %s; it was blacked out", job.filename)
            bar.update(len(batch))
    finally:
        bar.close()
    return [records[index] for index in sorted(records)]


def records_to_json(records: list[ImageRecord]) -> list[dict[str, Any]]:
    return [asdict(record) for record in records]
