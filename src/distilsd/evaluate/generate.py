"""Generating the evaluation images (``distilsd eval generate``), sharded and resumable.

The BK-SDM protocol: PNDM, 25 steps, guidance 7.5, 512 px, fp16 on a GPU, a different
starting noise for every caption from one seed (1234), JPEG files named after the COCO
images, then a 256 px bicubic copy of every image for scoring. Images go to
``OUTPUT/im512/<name>.jpg`` and ``OUTPUT/im256/<name>.jpg`` (``.png`` with
``image_format="png"``).

BK-SDM seeds one generator once and lets the captions consume it in order, so caption i's
noise depends on how many were drawn before it, on the batch size, and on the GPU's
generator. Here caption i's noise comes from its own CPU generator seeded with
:func:`caption_seed` ``(seed, i)``, i being the caption's line in the caption file: every
caption still starts from different noise, fixed by one seed, and an image no longer
depends on which process makes it, on the batch it is in, on the device, or on
``--limit`` leaving other captions out.

Under ``accelerate launch`` each process makes its own contiguous slice of the captions
(rank r of W gets captions ``[r*N//W, (r+1)*N//W)``): no image is made twice, none is
missed, and the set does not depend on W. A rerun skips images already written with the
same parameters, so a killed run resumes.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from distilsd.errors import InputError
from distilsd.generate import GenerationSettings, PromptSpec

logger = logging.getLogger(__name__)

PROTOCOL_SETTINGS = {
    "scheduler": "pndm",
    "num_inference_steps": 25,
    "guidance_scale": 7.5,
    "size": 512,
    "seed": 1234,
    "copy_size": 256,
    "image_format": "jpeg",
    "dtype": "auto",  # fp16 on a GPU, fp32 on the CPU (fp16 convolutions are slow or missing there)
}
RECORD_NAME = "eval-generate.json"


@dataclass
class EvalGenerationSettings:
    """The protocol settings of an evaluation run (BK-SDM defaults)."""

    scheduler: str = "pndm"
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    size: int = 512  # generated images are size x size
    copy_size: int | None = 256  # a resized copy for scoring; None: none
    seed: int = 1234  # caption i's noise comes from caption_seed(seed, i)
    negative_prompt: str = ""
    batch_size: int = 1
    dtype: str = "auto"  # fp16 on a GPU (BK-SDM's), fp32 elsewhere
    image_format: str = "jpeg"  # BK-SDM writes JPEG (PIL's quality 75); or "png"

    def generation_settings(self) -> GenerationSettings:
        settings = GenerationSettings(
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            height=self.size,
            width=self.size,
            negative_prompt=self.negative_prompt,
            seed=self.seed,
            batch_size=self.batch_size,
            image_format=self.image_format,
        )
        settings.validate()
        if self.copy_size is not None and not 16 <= self.copy_size <= self.size:
            raise InputError(f"--copy-size {self.copy_size} must be between 16 and --size {self.size}")
        return settings


def caption_seed(seed: int, index: int) -> int:
    """The noise seed of caption ``index`` (its line in the caption file) in a run seeded with ``seed``.

    A function of the two numbers alone (numpy's SeedSequence hashes them), so the image of a
    caption does not depend on which process makes it or on which other captions are made.
    """
    import numpy as np

    high, low = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return (int(high) << 31) | (int(low) >> 1)  # 63 bits: a torch seed and a JSON-safe integer


def with_caption_seeds(prompts: list, seed: int) -> list:
    """``prompts`` (a whole caption file, in order) with each one's noise seed set from its index."""
    return [replace(spec, seed=caption_seed(seed, index)) for index, spec in enumerate(prompts)]


def sample_captions(prompts: list, count: int, seed: int = 0) -> list:
    """A random sample of ``count`` captions (seeded), kept in file order; all of them if fewer."""
    if count >= len(prompts):
        return list(prompts)
    chosen = sorted(random.Random(seed).sample(range(len(prompts)), count))
    return [prompts[index] for index in chosen]


def resolve_eval_dtype(dtype: str, device_type: str) -> str:
    """'auto' is BK-SDM's fp16 on a GPU and fp32 elsewhere; anything else is kept."""
    if dtype != "auto":
        return dtype
    return "fp16" if device_type == "cuda" else "fp32"


def shard(items: list, rank: int, world_size: int) -> list:
    """Rank ``rank``'s contiguous slice of ``items``; the slices of all ranks partition ``items``."""
    start, stop = rank * len(items) // world_size, (rank + 1) * len(items) // world_size
    return items[start:stop]


def check_world_size(num_prompts: int, world_size: int) -> None:
    if world_size > num_prompts:
        raise InputError(
            f"{world_size} processes for {num_prompts} caption(s): some processes would have nothing to do",
            hint=f"launch at most {num_prompts} processes (accelerate launch --num_processes {num_prompts})",
        )


def write_resized_copy(source: Path, target: Path, size: int) -> bool:
    """Write ``source`` resized to ``size`` x ``size`` (PIL bicubic, as BK-SDM) unless an up-to-date copy exists."""
    from PIL import Image

    from distilsd.generate.core import save_png_atomically
    from distilsd.generate.metadata import read_image_parameters

    parameters = read_image_parameters(source) or ""
    if (
        target.exists()
        and read_image_parameters(target) == parameters
        and target.stat().st_mtime >= source.stat().st_mtime
    ):
        return False
    with Image.open(source) as image:
        copy = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    save_png_atomically(copy, target, parameters)
    return True


def remove_stale_temp_files(folder: Path) -> int:
    """Delete temp files left by killed runs (``.<name>.jpg.<pid>.tmp``); call only when no rank writes."""
    removed = 0
    for path in folder.glob(".*.*.tmp"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def generate_eval_images(
    model: str,
    prompts: list[PromptSpec],
    output_dir: str | Path,
    settings: EvalGenerationSettings | None = None,
    *,
    unet: str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Make this process's share of the evaluation images; return a summary of the whole run.

    ``prompts`` without a seed get their noise seed from their index in ``prompts``
    (:func:`with_caption_seeds`); give seeds (the CLI does, from the whole caption file)
    when ``prompts`` is a sample of a longer file. Works alone or under ``accelerate launch`` / ``torchrun`` (``accelerate.PartialState``
    gives the rank and world size). The main process writes the results record once all
    ranks are done.
    """
    from accelerate import PartialState

    from distilsd.evaluate.records import make_record, write_record
    from distilsd.generate import generate_images, load_pipeline, plan_jobs
    from distilsd.generate.core import IMAGE_FORMATS, check_output_dir

    settings = settings or EvalGenerationSettings()
    generation = settings.generation_settings()
    if any(spec.name is None for spec in prompts):
        raise InputError("every evaluation caption needs an image name")
    state = PartialState(cpu=device == "cpu")
    check_world_size(len(prompts), state.num_processes)

    output_dir = Path(output_dir)
    full_dir = output_dir / f"im{settings.size}"
    copy_dir = output_dir / f"im{settings.copy_size}" if settings.copy_size else None
    for folder in (full_dir, copy_dir):
        if folder is not None:
            check_output_dir(folder)

    if any(spec.seed is None for spec in prompts):
        prompts = [
            spec if spec.seed is not None else replace(spec, seed=caption_seed(settings.seed, index))
            for index, spec in enumerate(prompts)
        ]
    my_prompts = shard(prompts, state.process_index, state.num_processes)
    device_type = str(state.device.type) if device == "auto" else device
    dtype = resolve_eval_dtype(settings.dtype, device_type)
    loaded = load_pipeline(
        model,
        unet=unet,
        scheduler=settings.scheduler,
        dtype=dtype,
        device=device_type,
        safety_checker=False,
    )
    jobs = plan_jobs(my_prompts, generation)
    records = generate_images(
        loaded, jobs, generation, full_dir, progress=progress and state.is_local_main_process
    )
    copies = 0
    if copy_dir is not None:
        for record in records:
            source = Path(record.path)
            copies += write_resized_copy(source, copy_dir / source.name, settings.copy_size)

    made = sum(not record.skipped for record in records)
    logger.info(
        "rank %d/%d: %d made, %d already there, %d resized copies",
        state.process_index, state.num_processes, made, len(records) - made, copies,
    )  # fmt: skip
    state.wait_for_everyone()

    summary: dict[str, Any] = {
        "model": loaded.name,
        "num_captions": len(prompts),
        "num_processes": state.num_processes,
        "folders": {"full": str(full_dir), "copy": str(copy_dir) if copy_dir else None},
    }
    if state.is_main_process:
        for folder in (full_dir, copy_dir):
            if folder is not None:
                remove_stale_temp_files(folder)
        suffix = IMAGE_FORMATS[settings.image_format]
        written = {spec.name for spec in prompts if (full_dir / f"{spec.name}{suffix}").exists()}
        summary["num_images"] = len(written)
        settings_record = {
            "model": model,
            "unet": unet,
            "device": str(state.device),
            **asdict(settings),
            "dtype": dtype,
            "noise": "caption i: CPU generator seeded with caption_seed(seed, i)",
        }
        write_record(output_dir / RECORD_NAME, make_record("eval-generate", settings_record, summary))
    return summary
