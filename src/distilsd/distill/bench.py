"""Training throughput with and without the latent cache, measured in one go."""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _steady_throughput(rows: list[dict[str, Any]], samples_per_step: int) -> tuple[float, float]:
    """(samples/s, s/step) over the steps after the first (warm-up: allocations, lazy inits)."""
    times = [samples_per_step / row["samples_per_s"] for row in rows[1:] if row.get("samples_per_s")]
    if not times:
        return 0.0, 0.0
    total = sum(times)
    return len(times) * samples_per_step / total, statistics.median(times)


def _device_label() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def benchmark_training(
    teacher: str | None = None,
    arch: str = "bk-tiny",
    data: str | None = None,
    num_images: int = 64,
    resolution: int = 64,
    batch_size: int = 8,
    steps: int = 20,
    mixed_precision: str = "fp32",
    num_workers: int = 0,
) -> dict[str, Any]:

    from distilsd.errors import InputError

    from .config import load_config
    from .run import run_training

    for flag, value in (("--steps", steps), ("--batch-size", batch_size), ("--num-images", num_images)):
        if value < 1:
            raise InputError(f"{flag} {value} must be at least 1")

    with tempfile.TemporaryDirectory(prefix="distilsd-bench-") as tmp:
        tmp_path = Path(tmp)
        if teacher is None:
            from distilsd.testing import save_tiny_pipeline

            teacher = str(save_tiny_pipeline(tmp_path / "teacher"))
            teacher_label = "tiny random SD v1 pipeline (distilsd.testing)"
        else:
            teacher_label = teacher
        if data is None:
            from .samples import write_shapes_folder

            data = str(write_shapes_folder(tmp_path / "data", num_images, size=resolution))
        common = {
            "teacher": teacher,
            "arch": arch,
            "data.source": data,
            "data.resolution": resolution,
            "data.crop": "center",
            "data.cache_dir": str(tmp_path / "cache"),
            "data.num_workers": num_workers,
            "train_batch_size": batch_size,
            "max_steps": steps + 1,
            "mixed_precision": mixed_precision,
            "checkpoint_every": 0,
            "validation.prompts": [],
            "log_with": ["csv"],
            "progress_bar": False,
        }
        results: dict[str, Any] = {}
        for mode, cached in (("uncached", False), ("cached", True)):
            started = time.perf_counter()
            summary = run_training(
                load_config(
                    overrides={
                        **common,
                        "output_dir": str(tmp_path / f"run-{mode}"),
                        "data.cache_latents": cached,
                    }
                )
            )
            wall = time.perf_counter() - started
            samples_per_s, s_per_step = _steady_throughput(summary.losses, batch_size)
            results[mode] = {
                "samples_per_s": samples_per_s,
                "s_per_step": s_per_step,
                "wall_s": wall,
                "cache_build_s": summary.cache_build_s,
            }
        results["setup"] = {
            "teacher": teacher_label,
            "arch": arch,
            "resolution": resolution,
            "batch_size": batch_size,
            "steps": steps,
            "mixed_precision": mixed_precision,
            "device": _device_label(),
        }
    return results


def format_benchmark(results: dict[str, Any]) -> str:
    setup = results["setup"]
    uncached, cached = results["uncached"], results["cached"]
    speedup = (
        cached["samples_per_s"] / uncached["samples_per_s"] if uncached["samples_per_s"] else float("nan")
    )
    lines = [
        f"distill throughput: {setup['arch']} student, teacher {setup['teacher']}",
        f"  {setup['resolution']} px, batch {setup['batch_size']}, {setup['steps']} timed steps after 1 warm-up, mixed precision {setup['mixed_precision']}, {setup['device']}",
        "",
        f"  {'':<14}{'uncached':>12}{'cached':>12}",
        f"  {'samples/s':<14}{uncached['samples_per_s']:>12.2f}{cached['samples_per_s']:>12.2f}",
        f"  {'s/step (med.)':<14}{uncached['s_per_step']:>12.4f}{cached['s_per_step']:>12.4f}",
        f"  {'speed-up':<14}{'1.00x':>12}{f'{speedup:.2f}x':>12}",
        "",
        f"  one-time cache build: {cached['cache_build_s']:.2f} s (later runs on the same model, data and resolution reuse it)",
    ]
    return "\n".join(lines)


def benchmark_personalisation(
    model: str,
    *,
    student: str | None = None,
    arch: str | None = "bk-tiny",
    data: str | None = None,
    num_images: int = 16,
    resolution: int = 64,
    batch_size: int = 4,
    steps: int = 10,
    lora_rank: int = 4,
    mixed_precision: str = "fp32",
) -> dict[str, Any]:
    """LoRA and full (DreamBooth) fine-tuning steps/s of ``model``'s U-Net and of its student, one run.

    The student is ``student`` (a U-Net or pipeline folder, e.g. what ``compress`` wrote) or
    ``model``'s U-Net with the blocks of ``arch`` removed; both train on the same data, batch
    and seed. DreamBooth is this same training step on instance + class images.
    """

    from .config import TrainConfig, load_config
    from .run import run_training

    with tempfile.TemporaryDirectory(prefix="distilsd-bench-") as tmp:
        tmp_path = Path(tmp)
        if data is None:
            from .samples import write_shapes_folder

            data = str(write_shapes_folder(tmp_path / "data", num_images, size=resolution))
        common = {
            "model": model,
            "data.source": data,
            "data.resolution": resolution,
            "data.cache_latents": True,  # the U-Net step is what differs; keep the VAE out of it
            "data.cache_dir": str(tmp_path / "cache"),
            "train_batch_size": batch_size,
            "max_steps": steps + 1,
            "mixed_precision": mixed_precision,
            "checkpoint_every": 0,
            "validation.prompts": [],
            "log_with": ["csv"],
            "progress_bar": False,
            "optim.ema": False,
            "loss.l_out": 0.0,
            "loss.l_feat": 0.0,
        }
        students = {"student": student} if student else {"arch": arch}
        results: dict[str, Any] = {}
        for who, extra in (("teacher", {}), ("student", students)):
            for how, lora in (("lora", {"lora.rank": lora_rank}), ("full", {})):
                overrides = {**common, **extra, **lora, "output_dir": str(tmp_path / f"{who}-{how}")}
                summary = run_training(load_config(overrides=overrides, base=TrainConfig()))
                samples_per_s, s_per_step = _steady_throughput(summary.losses, batch_size)
                results[f"{who}-{how}"] = {
                    "steps_per_s": samples_per_s / batch_size,
                    "s_per_step": s_per_step,
                }
        results["setup"] = {
            "model": model,
            "student": student or f"{model} with {arch}",
            "resolution": resolution,
            "batch_size": batch_size,
            "steps": steps,
            "lora_rank": lora_rank,
            "device": _device_label(),
        }
    return results


def format_personalisation(results: dict[str, Any]) -> str:
    setup = results["setup"]
    lines = [
        f"personalisation training: {setup['model']} against its student {setup['student']}",
        f"  {setup['resolution']} px, batch {setup['batch_size']}, LoRA rank {setup['lora_rank']}, {setup['steps']} timed steps after 1 warm-up, {setup['device']}",
        "",
        f"  {'':<22}{'teacher':>10}{'student':>10}{'speed-up':>10}",
    ]
    for how, label in (("lora", "LoRA steps/s"), ("full", "DreamBooth steps/s")):
        teacher, student = results[f"teacher-{how}"]["steps_per_s"], results[f"student-{how}"]["steps_per_s"]
        speedup = student / teacher if teacher else float("nan")
        lines.append(f"  {label:<22}{teacher:>10.3f}{student:>10.3f}{f'{speedup:.2f}x':>10}")
    return "\n".join(lines)
