"""Generating the evaluation images (``distilsd eval generate``), sharded and resumable.

The BK-SDM protocol: PNDM, 25 steps, guidance 7.5, 512 px, seed 1234 for every caption,
then a 256 px copy of every image for scoring. Images go to ``OUTPUT/im512/<name>.png``
and ``OUTPUT/im256/<name>.png``.

Under ``accelerate launch`` each process makes its own contiguous slice of the captions
(rank r of W gets captions ``[r*N//W, (r+1)*N//W)``): no image is made twice, none is
missed, and since every image has its own seed the set does not depend on W. A rerun
skips images already written with the same parameters, so a killed run resumes.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
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
    seed: int = 1234  # every caption's image uses this seed
    negative_prompt: str = ""
    batch_size: int = 1
    dtype: str = "fp32"

    def generation_settings(self) -> GenerationSettings:
        settings = GenerationSettings(
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            height=self.size,
            width=self.size,
            negative_prompt=self.negative_prompt,
            seed=self.seed,
            batch_size=self.batch_size,
        )
        settings.validate()
        if self.copy_size is not None and not 16 <= self.copy_size <= self.size:
            raise InputError(f"--copy-size {self.copy_size} must be between 16 and --size {self.size}")
        return settings


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
    """Write ``source`` resized to ``size`` x ``size`` (PIL bicubic) unless an up-to-date copy exists."""
    from PIL import Image

    from distilsd.generate.core import save_png_atomically
    from distilsd.generate.metadata import read_png_parameters

    parameters = read_png_parameters(source) or ""
    if (
        target.exists()
        and read_png_parameters(target) == parameters
        and target.stat().st_mtime >= source.stat().st_mtime
    ):
        return False
    with Image.open(source) as image:
        copy = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    save_png_atomically(copy, target, parameters)
    return True


def remove_stale_temp_files(folder: Path) -> int:
    """Delete temp files left by killed runs (``.<name>.png.<pid>.tmp``); call only when no rank writes."""
    removed = 0
    for path in folder.glob(".*.png.*.tmp"):
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

    Works alone or under ``accelerate launch`` / ``torchrun`` (``accelerate.PartialState``
    gives the rank and world size). The main process writes the results record once all
    ranks are done.
    """
    from accelerate import PartialState

    from distilsd.evaluate.records import make_record, write_record
    from distilsd.generate import generate_images, load_pipeline, plan_jobs
    from distilsd.generate.core import check_output_dir

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

    my_prompts = shard(prompts, state.process_index, state.num_processes)
    loaded = load_pipeline(
        model,
        unet=unet,
        scheduler=settings.scheduler,
        dtype=settings.dtype,
        device=str(state.device.type) if device == "auto" else device,
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
        written = {spec.name for spec in prompts if (full_dir / f"{spec.name}.png").exists()}
        summary["num_images"] = len(written)
        settings_record = {"model": model, "unet": unet, "device": str(state.device), **asdict(settings)}
        write_record(output_dir / RECORD_NAME, make_record("eval-generate", settings_record, summary))
    return summary
