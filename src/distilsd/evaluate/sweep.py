"""Guidance sweeps (``distilsd eval sweep``): FID and CLIP score per model and guidance scale.

Like the SD v1.5 model card's figure: for every model and guidance scale, generate the
caption set (protocol settings otherwise), score it against one reference, and plot FID
against CLIP score, one curve per model.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from distilsd.errors import InputError, MissingDependencyError
from distilsd.evaluate.generate import EvalGenerationSettings, generate_eval_images
from distilsd.generate import PromptSpec

DEFAULT_GUIDANCE_SCALES = (1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)  # the SD v1.5 card's sweep


def split_model(text: str) -> tuple[str, str | None]:
    """``PIPELINE`` or ``PIPELINE::UNET`` (a student U-Net on a base pipeline; ``+`` is the old spelling)."""
    from distilsd.models import split_base_unet

    return split_base_unet(text)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:80] or "model"


def folder_names(parsed: list[tuple[str, str | None]]) -> list[str]:
    """A short, unique folder name per model: the folder's own name for local paths."""
    names: list[str] = []
    for model, unet in parsed:
        parts = [Path(part).name if Path(part).exists() else part for part in (model, unet) if part]
        name = _slug("+".join(parts))
        candidate, n = name, 2
        while candidate in names:
            candidate, n = f"{name}-{n}", n + 1
        names.append(candidate)
    return names


def run_sweep(
    models: list[str],
    prompts: list[PromptSpec],
    output_dir: str | Path,
    reference: str | Path,
    *,
    guidance_scales: tuple[float, ...] = DEFAULT_GUIDANCE_SCALES,
    settings: EvalGenerationSettings | None = None,
    score_options: dict[str, Any] | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any] | None:
    """Generate and score every (model, guidance scale); the main process returns the table rows.

    Images go to ``OUTPUT/<model>/g<scale>/im<size>/``; a rerun resumes. Generation is
    sharded under ``accelerate launch``; scoring runs on the main process only.
    """
    from accelerate import PartialState

    from distilsd.evaluate import metrics
    from distilsd.evaluate.score import score_images

    if not models:
        raise InputError("no model to sweep", hint="give --model (repeatable)")
    if not guidance_scales or any(not (math.isfinite(g) and g >= 0) for g in guidance_scales):
        raise InputError(
            f"--guidance: every scale must be a finite number >= 0, got {','.join(map(str, guidance_scales))}"
        )
    parsed = [split_model(model) for model in models]
    settings = settings or EvalGenerationSettings()
    score_options = dict(score_options or {})
    metrics_to_compute = score_options.pop("metrics_to_compute", ("fid", "clip"))
    output_dir = Path(output_dir)
    # Every input is checked before the first image: a missing reference or weight file
    # must not surface after minutes of generation.
    from distilsd.evaluate.score import check_scoring_inputs
    from distilsd.generate.core import check_output_dir
    from distilsd.models import check_model_source

    check_scoring_inputs(metrics_to_compute, reference, **score_options)
    for model, unet in parsed:
        check_model_source(model, unet=unet)
    check_output_dir(output_dir)
    state = PartialState(cpu=device == "cpu")

    # The reference statistics are computed once, not once per point.
    reference_path = Path(reference)
    if "fid" in metrics_to_compute and reference_path.suffix.lower() != ".npz":
        stats_path = output_dir / "reference-stats.npz"
        if state.is_main_process and not stats_path.exists():
            dims = score_options.get("fid_dims", metrics.FID_FEATURE_DIMS)
            reference_set = metrics.ImageSet.from_folder(
                reference_path,
                score_options.get("size", metrics.PROTOCOL_IMAGE_SIZE),
                "the --reference folder",
            )
            if len(reference_set.paths) < 2:
                raise InputError(
                    f"FID needs at least 2 reference images, but {reference_path} has {len(reference_set.paths)}"
                )
            from distilsd.models import resolve_device

            torch_device = resolve_device(device)
            inception = metrics.load_fid_inception(
                score_options.get("inception_weights"), torch_device, dims=dims
            )
            features = metrics.inception_features(
                reference_set, inception, score_options.get("batch_size", 50), torch_device
            )
            metrics.save_statistics(stats_path, *metrics.feature_statistics(features))
        state.wait_for_everyone()
        reference_path = stats_path

    rows = []
    for (model, unet), folder in zip(parsed, folder_names(parsed), strict=True):
        model_label = model + (f"+{unet}" if unet else "")
        for guidance in guidance_scales:
            point_settings = EvalGenerationSettings(**{**asdict(settings), "guidance_scale": guidance})
            point_dir = output_dir / folder / f"g{guidance:g}"
            generate_eval_images(
                model, prompts, point_dir, point_settings, unet=unet, device=device, progress=progress
            )
            if not state.is_main_process:
                continue
            scored_dir = point_dir / f"im{settings.copy_size or settings.size}"
            results = score_images(
                scored_dir,
                reference=reference_path,
                metrics_to_compute=metrics_to_compute,
                device=device,
                **score_options,
            )
            rows.append(
                {
                    "model": model_label,
                    "guidance_scale": guidance,
                    "images": str(scored_dir),
                    **{k: v for k, v in results.items() if k != "notes"},
                    "notes": results["notes"],
                }
            )
    state.wait_for_everyone()
    return {"rows": rows} if state.is_main_process else None


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = [("fid", "FID"), ("inception_score", "IS"), ("clip_score", "CLIP")]
    present = [(key, title) for key, title in columns if any(key in row for row in rows)]
    lines = [
        "| model | guidance | " + " | ".join(title for _, title in present) + " |",
        "|---|---|" + "---|" * len(present),
    ]
    for row in rows:
        cells = [f"{row[key]:.4f}" if key in row else "-" for key, _ in present]
        lines.append(f"| {row['model']} | {row['guidance_scale']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fid_clip_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """FID (y) against CLIP score (x), one curve per model, points labelled with their guidance."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("matplotlib", "eval", "the sweep plot") from None

    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    for model in dict.fromkeys(row["model"] for row in rows):
        points = [row for row in rows if row["model"] == model and "fid" in row and "clip_score" in row]
        xs, ys = [row["clip_score"] for row in points], [row["fid"] for row in points]
        axes.plot(xs, ys, marker="o", label=model)
        for row, x, y in zip(points, xs, ys, strict=True):
            axes.annotate(
                f"{row['guidance_scale']:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7
            )
    axes.set_xlabel("CLIP score")
    axes.set_ylabel("FID")
    axes.set_title("FID vs CLIP score over guidance scales")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
