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
    import torch

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
            "device": torch.cuda.get_device_name(0)
            if torch.cuda.is_available()
            else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
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
