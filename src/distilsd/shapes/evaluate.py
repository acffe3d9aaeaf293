"""``distilsd shapes eval``: how well a model draws the Shapes world.

A fixed set of held-out prompts (single-object and two-object, from seeds no training set
uses) is generated with the model; the judge scores alignment per group, and Shapes-FID
compares the judge's features of the generated images with those of renders of the same
scenes. Any text-to-image model can be scored; only Shapes-trained ones score well.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from distilsd.errors import InputError
from distilsd.shapes.captions import parse_caption
from distilsd.shapes.world import COLORS, TRAIN_SHAPES, Scene, render, sample_scene

EVAL_PROMPT_SEED = 303
# Unless told otherwise: 25 steps (generate's) and SD's guidance 7.5 (what the first published
# Shapes numbers used), or an LCM model's own steps and guidance (its distill_info.json).
EVAL_STEPS = 25
EVAL_GUIDANCE = 7.5


def heldout_scenes(num_objects: int, count: int, seed: int = EVAL_PROMPT_SEED) -> list[Scene]:
    """The fixed held-out prompt set: ``count`` scenes of ``num_objects`` objects each."""
    import random

    return [sample_scene(random.Random(f"eval-{seed}-{num_objects}-{i}"), num_objects) for i in range(count)]


# The alignment scores: (number of objects in the prompt, is_aligned mode).
ALIGNMENT_METRICS: dict[str, tuple[int, str]] = {
    "alignment_single": (1, "exact"),
    "alignment_two": (2, "exact"),
    "alignment_single_contains": (1, "contains"),
    "alignment_two_contains": (2, "contains"),
}
RECORDS_NAME = "judged.jsonl"  # beside the images: what the judge read in each
TIMING_NAME = "generation_time.json"  # beside the images: generation seconds, kept across resumed runs


@dataclass
class ShapesScores:
    model: str
    prompts_per_group: int
    steps: int
    guidance_scale: float
    # 'exact': the image holds the prompt's objects and no others; 'contains': extras allowed.
    alignment_single: float
    alignment_two: float
    alignment_single_contains: float
    alignment_two_contains: float
    shapes_fid: float
    seconds_per_image: float
    # 95% percentile-bootstrap interval of every alignment, resampling prompts: metric -> [low, high].
    intervals: dict[str, list[float]] = field(default_factory=dict)
    prompt_seed: int = 0
    # The judge that read the images: 'two-stage', 'one-stage' or a folder; None in records
    # written before the two-stage judge was the default (2026-12-04), which the one-stage judge read.
    judge: str | None = None
    # Fidelity to the first model of a comparison (an f32 export against its int8 twin, a
    # teacher against its student): same prompts and seeds, so the images pair up.
    shapes_fid_vs_first: float | None = None
    psnr_vs_first: float | None = None
    # This model minus each earlier one of the comparison, paired on prompts and seeds:
    # other model -> metric -> {value, low, high}.
    differences: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    # Per-prompt verdicts (metric -> 0/1 per prompt of its group), for paired differences.
    verdicts: dict[str, list[int]] = field(default_factory=dict, repr=False)


def _timing_settings(loaded, settings) -> dict:
    return {
        "model": loaded.name,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype),
        "steps": settings.num_inference_steps,
        "guidance_scale": settings.guidance_scale,
        "batch_size": settings.batch_size,
    }


def _seconds_per_image(loaded, jobs, settings, output_dir: Path, made: int, seconds: float) -> float:
    """Generation seconds per image, over every run that made images in ``output_dir``.

    A resumed run that finds every image already there reports the earlier runs' time
    (kept in :data:`TIMING_NAME`); a folder with no such record (images from elsewhere) is
    timed on one fresh batch made into a temporary folder.
    """
    import tempfile

    from distilsd.generate import generate_images

    record_path = output_dir / TIMING_NAME
    wanted = _timing_settings(loaded, settings)
    record = {"settings": wanted, "images": 0, "seconds": 0.0}
    if record_path.exists():
        previous = json.loads(record_path.read_text())
        if previous.get("settings") == wanted:
            record = previous
    if made == 0 and record["images"] == 0:
        batch = jobs[: settings.batch_size]
        with tempfile.TemporaryDirectory() as scratch:
            start = time.perf_counter()
            generate_images(loaded, batch, settings, scratch, progress=False)
            made, seconds = len(batch), time.perf_counter() - start
    if made:  # a run that made nothing spent its time checking files, not generating
        record["images"] += made
        record["seconds"] += seconds
    write_text_atomically(record_path, json.dumps(record, indent=2) + "\n")
    return record["seconds"] / record["images"]


def write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def shapes_eval(
    model: str,
    output_dir: str | Path,
    *,
    unet: str | None = None,
    prompts_per_group: int = 200,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    scheduler: str | None = None,
    seed: int = 0,
    prompt_seed: int = EVAL_PROMPT_SEED,
    batch_size: int = 8,
    dtype: str = "fp32",
    device: str = "auto",
    progress: bool = True,
    vae: str | None = None,
    deepcache: int | None = None,
    tome: float | None = None,
    judge: str | Path | None = None,
) -> ShapesScores:
    """Generate the held-out prompts with ``model`` into ``output_dir`` and score them.

    Beside the images, :data:`RECORDS_NAME` holds one line per image: its file, prompt and
    seed, the objects the judge read (colour, shape, centre, probability) and the verdicts,
    so any verdict can be checked against the image or another detector. ``vae``,
    ``deepcache`` and ``tome`` are ``generate``'s speed-ups (docs/fast.md). Steps and guidance
    default to :data:`EVAL_STEPS` and :data:`EVAL_GUIDANCE`, or to an LCM model's own.
    ``judge``: a built-in judge's name or a folder (``shapes train-judge -o``); None: the default, two-stage.
    """
    from distilsd.evaluate.stats import bootstrap_mean
    from distilsd.generate import GenerationSettings, PromptSpec, generate_images, load_pipeline, plan_jobs
    from distilsd.schedulers import apply_few_step_defaults, few_step_defaults
    from distilsd.shapes.judge import (
        ALIGNMENT_MODES,
        frechet_distance,
        is_aligned,
        judge_name,
        load_judge,
        read_images,
    )

    num_inference_steps, guidance_scale, scheduler = apply_few_step_defaults(
        few_step_defaults(model), num_inference_steps, guidance_scale, scheduler
    )
    num_inference_steps = EVAL_STEPS if num_inference_steps is None else num_inference_steps
    guidance_scale = EVAL_GUIDANCE if guidance_scale is None else guidance_scale

    if prompts_per_group < 2:
        raise InputError(
            f"--prompts-per-group {prompts_per_group} must be >= 2 (an interval needs two prompts)"
        )
    reader = load_judge(judge)
    groups = {
        1: heldout_scenes(1, prompts_per_group, seed=prompt_seed),
        2: heldout_scenes(2, prompts_per_group, seed=prompt_seed),
    }
    specs = [
        PromptSpec(scene.caption, name=f"{n}obj-{i:04d}")
        for n, scenes in groups.items()
        for i, scene in enumerate(scenes)
    ]
    settings = GenerationSettings(
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        batch_size=batch_size,
    )
    settings.validate()
    loaded = load_pipeline(
        model, unet=unet, scheduler=scheduler, dtype=dtype, device=device, safety_checker=False,
        vae=vae, deepcache=deepcache, tome=tome,
    )  # fmt: skip
    jobs = plan_jobs(specs, settings)
    output_dir = Path(output_dir)
    start = time.perf_counter()
    records = generate_images(loaded, jobs, settings, output_dir, progress=progress)
    seconds = time.perf_counter() - start
    made = sum(not r.skipped for r in records)
    seconds_per_image = _seconds_per_image(loaded, jobs, settings, output_dir, made, seconds)

    from PIL import Image

    readings = read_images(reader, [Image.open(r.path) for r in records])
    scenes = groups[1] + groups[2]
    targets = [parse_caption(scene.caption) for scene in scenes]
    verdicts = {
        mode: [
            int(is_aligned(reading, target, mode)) for reading, target in zip(readings, targets, strict=True)
        ]
        for mode in ALIGNMENT_MODES
    }
    lines = [
        json.dumps(
            {
                "file": Path(record.path).name,
                "prompt": record.prompt,
                "objects_asked": len(target.objects),
                "seed": record.seed,
                "read": reading.to_json(),
                "aligned": {mode: bool(verdicts[mode][i]) for mode in ALIGNMENT_MODES},
            }
        )
        for i, (record, reading, target) in enumerate(zip(records, readings, targets, strict=True))
    ]
    write_text_atomically(output_dir / RECORDS_NAME, "\n".join(lines) + "\n")

    reference = read_images(reader, [render(scene) for scene in scenes])
    fid = frechet_distance(
        np.stack([r.features for r in readings]), np.stack([r.features for r in reference])
    )
    n = prompts_per_group
    by_metric = {
        metric: verdicts[mode][:n] if objects == 1 else verdicts[mode][n:]
        for metric, (objects, mode) in ALIGNMENT_METRICS.items()
    }
    estimates = {metric: bootstrap_mean(values) for metric, values in by_metric.items()}
    return ShapesScores(
        model=loaded.name,
        prompts_per_group=n,
        steps=num_inference_steps,
        guidance_scale=guidance_scale,
        **{metric: estimate.value for metric, estimate in estimates.items()},
        shapes_fid=fid,
        seconds_per_image=seconds_per_image,
        intervals={metric: [estimate.low, estimate.high] for metric, estimate in estimates.items()},
        prompt_seed=prompt_seed,
        verdicts=by_metric,
        judge=judge_name(judge),
    )


def add_differences(scores: list[ShapesScores]) -> None:
    """Fill each model's ``differences``: its alignments minus every earlier model's, paired on prompts."""
    from distilsd.evaluate.stats import paired_difference

    for i, later in enumerate(scores):
        for j, earlier in enumerate(scores[:i]):
            key = (
                earlier.model
                if earlier.model not in later.differences
                else f"{earlier.model} (model {j + 1})"
            )
            later.differences[key] = {
                metric: paired_difference(later.verdicts[metric], earlier.verdicts[metric]).to_json()
                for metric in ALIGNMENT_METRICS
            }


def add_fidelity_to_first(
    scores: list[ShapesScores], image_dirs: list[Path], judge: str | Path | None = None
) -> None:
    """Fill ``shapes_fid_vs_first`` and ``psnr_vs_first`` of every model but the first.

    Shapes-FID between the judge's features of a model's images and the first model's, and
    the PSNR of the pooled pixel error between images of the same prompt and seed.
    """
    from PIL import Image

    from distilsd.shapes.judge import frechet_distance, load_judge, read_images

    judge = load_judge(judge)
    # This run's images only: a folder may hold more from an earlier run with more prompts.
    count = scores[0].prompts_per_group
    names = [f"{n}obj-{i:04d}.png" for n in (1, 2) for i in range(count)]

    def load(folder: Path) -> list:
        return [Image.open(folder / name).convert("RGB") for name in names]

    first_images = load(image_dirs[0])
    first_pixels = np.stack([np.asarray(image, dtype=np.float64) / 255 for image in first_images])
    first_features = np.stack([r.features for r in read_images(judge, first_images)])
    for score, folder in zip(scores[1:], image_dirs[1:], strict=True):
        images = load(folder)
        pixels = np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images])
        mse = float(np.mean((pixels - first_pixels) ** 2))
        score.psnr_vs_first = float("inf") if mse == 0 else float(10 * np.log10(1 / mse))
        features = np.stack([r.features for r in read_images(judge, images)])
        score.shapes_fid_vs_first = frechet_distance(features, first_features)


def _with_interval(score: ShapesScores, metric: str) -> str:
    low, high = score.intervals[metric]
    return f"{getattr(score, metric):.3f} [{low:.2f}, {high:.2f}]"


def scores_table(scores: list[ShapesScores]) -> str:
    """Markdown: each model's alignments with 95% intervals, Shapes-FID, s/image; then paired differences."""
    compared = any(s.psnr_vs_first is not None for s in scores)
    header = "| model | align (1 obj) | align (2 obj) | contains (1 obj) | contains (2 obj) | Shapes-FID | s / image |"
    if compared:
        header += " Shapes-FID vs first | PSNR vs first (dB) |"
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for s in scores:
        cells = " | ".join(_with_interval(s, metric) for metric in ALIGNMENT_METRICS)
        row = f"| {s.model} | {cells} | {s.shapes_fid:.2f} | {s.seconds_per_image:.2f} |"
        if compared:
            fid = "-" if s.shapes_fid_vs_first is None else f"{s.shapes_fid_vs_first:.2f}"
            psnr = "-" if s.psnr_vs_first is None else f"{s.psnr_vs_first:.1f}"
            row += f" {fid} | {psnr} |"
        lines.append(row)
    differences = [(s, other, d) for s in scores for other, d in s.differences.items()]
    if differences:
        lines += [
            "",
            f"Paired differences on the same {scores[0].prompts_per_group} prompts per group and seeds, 95% bootstrap intervals:",
            "",
            "| difference | align (1 obj) | align (2 obj) | contains (1 obj) | contains (2 obj) |",
            "|---|---|---|---|---|",
        ]
        for s, other, by_metric in differences:
            cells = " | ".join(
                f"{d['value']:+.3f} [{d['low']:+.2f}, {d['high']:+.2f}]"
                for d in (by_metric[metric] for metric in ALIGNMENT_METRICS)
            )
            lines.append(f"| {s.model} - {other} | {cells} |")
    return "\n".join(lines)


def scores_to_json(scores: ShapesScores) -> dict:
    record = asdict(scores)
    del record["verdicts"]  # per prompt, in each model's judged.jsonl
    if record["psnr_vs_first"] == float("inf"):
        record["psnr_vs_first"] = "inf"  # identical images; JSON has no infinity
    return record


def alignment_scores(image_paths, captions) -> dict[str, float]:
    """Shapes alignment of generated images, for ``distilsd eval score --family shapes``.

    Captions that name no Shapes object are left out (and counted). ``shapes_alignment*``
    counts an image with objects the caption did not ask for as a miss, ``*_contains`` does
    not (see :func:`distilsd.shapes.judge.is_aligned`). Shapes-FID is not given
    here: it needs the renders of the prompts' exact scenes, which only ``shapes eval`` has.
    """
    from PIL import Image

    from distilsd.shapes.judge import is_aligned, load_judge, read_images

    targets = [parse_caption(caption) for caption in captions]
    kept = [(path, target) for path, target in zip(image_paths, targets, strict=True) if target is not None]
    scores: dict[str, float] = {
        "shapes_prompts": float(len(kept)),
        "shapes_unparsed": float(len(targets) - len(kept)),
    }
    if not kept:
        return scores
    readings = read_images(load_judge(), [Image.open(path) for path, _ in kept])
    counts = np.array([len(t.objects) for _, t in kept])
    for mode, suffix in (("exact", ""), ("contains", "_contains")):
        aligned = np.array(
            [is_aligned(r, t, mode) for r, (_, t) in zip(readings, kept, strict=True)], dtype=float
        )
        scores[f"shapes_alignment{suffix}"] = float(aligned.mean())
        for n, label in ((1, "single"), (2, "two")):
            if (counts == n).any():
                scores[f"shapes_alignment_{label}{suffix}"] = float(aligned[counts == n].mean())
    return scores


@dataclass
class VAEScores:
    model: str
    prompts_per_group: int
    render_alignment_single: float
    render_alignment_two: float
    reconstruction_alignment_single: float
    reconstruction_alignment_two: float
    reconstruction_shapes_fid: float
    reconstruction_l1: float  # mean absolute error in [0, 255] pixel levels
    # With a tiny decoder: the full VAE's own round trip on the same renders, and per group the
    # paired difference (tiny minus VAE, exact alignment) with its bootstrap interval.
    vae_alignment_single: float | None = None
    vae_alignment_two: float | None = None
    tiny_minus_vae: dict | None = None
    judge: str | None = None  # the judge that read the images (None in records written before 2026-12-04)
    # The same alignments read by the classical reader (shapes/classic.py: no learnt weights),
    # a second, independent check of the judge's: {"render_alignment_single": ..., "tiny_minus_vae": ...}.
    classic: dict | None = None


def vae_scores(
    model: str | Path,
    *,
    prompts_per_group: int = 200,
    batch_size: int = 50,
    tiny_vae: str | None = None,
    judge: str | Path | None = None,
) -> VAEScores:
    """How much of a Shapes scene survives a VAE round trip, read by the judge.

    The held-out scenes of ``shapes eval`` are rendered, encoded (latent means), decoded and
    judged. A teacher cannot align better than its VAE lets it, so a VAE is worth checking
    (>= 0.95 here) before a U-Net is trained on its latents. With ``tiny_vae`` (a folder, or
    ``tiny`` for the model's own) the VAE's latents are decoded by that tiny decoder instead,
    as ``generate --vae`` does. ``judge``: a built-in judge's name or a folder; None: the default.
    """
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from distilsd.errors import ModelLoadError
    from distilsd.models import BUILTIN_MODELS, builtin_folder, load_component
    from distilsd.shapes.classic import ClassicReading, read_classic
    from distilsd.shapes.judge import frechet_distance, is_aligned, judge_name, load_judge, read_images

    # A built-in name (`shapes`) means its assembled pipeline folder, as everywhere else.
    path = builtin_folder(model) if str(model) in BUILTIN_MODELS and not Path(model).exists() else Path(model)
    subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
    if subfolder is None and not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is neither a pipeline folder with vae/ nor a VAE folder")
    vae = load_component(AutoencoderKL, str(path), subfolder, what="VAE").eval()
    decode = full_decode = vae.decode
    if tiny_vae is not None:
        from distilsd.tiny_vae import check_tiny_vae_fits, load_tiny_vae, read_tiny_vae_info, tiny_vae_folder

        folder = tiny_vae_folder(tiny_vae, path if subfolder else None)
        tiny = load_tiny_vae(folder)
        check_tiny_vae_fits(tiny, vae, read_tiny_vae_info(folder), str(tiny_vae))
        # The tiny decoder takes the U-Net's scaled latents.
        decode = lambda latents: tiny.decode(latents * vae.config.scaling_factor)  # noqa: E731
    judge_model = load_judge(judge)
    scenes = heldout_scenes(1, prompts_per_group) + heldout_scenes(2, prompts_per_group)
    renders = [render(scene) for scene in scenes]
    reconstructions, vae_reconstructions = [], []
    errors = []
    with torch.no_grad():
        for start in range(0, len(renders), batch_size):
            batch = np.stack(
                [
                    np.asarray(im.convert("RGB"), dtype=np.float32)
                    for im in renders[start : start + batch_size]
                ]
            )
            pixels = torch.from_numpy(batch / 127.5 - 1.0).permute(0, 3, 1, 2)
            latents = vae.encode(pixels).latent_dist.mean
            levels = _levels(decode(latents).sample)
            errors.append(np.abs(levels - batch).mean(axis=(1, 2, 3)))
            reconstructions += [Image.fromarray(level.astype(np.uint8)) for level in levels]
            if tiny_vae is not None:  # the same latents through the full decoder, to pair with
                vae_reconstructions += [
                    Image.fromarray(level.astype(np.uint8)) for level in _levels(full_decode(latents).sample)
                ]
    n = prompts_per_group
    targets = [parse_caption(scene.caption) for scene in scenes]
    features = {}
    aligned: dict[str, dict[str, list[bool]]] = {"judge": {}, "classic": {}}
    images_by_name = {"render": renders, "reconstruction": reconstructions, "vae": vae_reconstructions}
    for name, images in images_by_name.items():
        if not images:
            continue
        readings = read_images(judge_model, images)
        features[name] = np.stack([r.features for r in readings])
        classic = [ClassicReading(read_classic(image)) for image in images]
        for reader, reads in (("judge", readings), ("classic", classic)):
            aligned[reader][name] = [is_aligned(r, t) for r, t in zip(reads, targets, strict=True)]
    scores = {reader: _vae_alignments(by_name, n) for reader, by_name in aligned.items()}
    return VAEScores(
        model=str(model) + (f" + tiny VAE {tiny_vae}" if tiny_vae else ""),
        prompts_per_group=n,
        reconstruction_shapes_fid=frechet_distance(features["reconstruction"], features["render"]),
        reconstruction_l1=float(np.concatenate(errors).mean()),
        **scores["judge"],
        classic=scores["classic"],
        judge=judge_name(judge),
    )


def _vae_alignments(aligned: dict[str, list[bool]], n: int) -> dict:
    """Per image set its alignment per group and, with a tiny decoder, tiny minus VAE (paired)."""
    from distilsd.evaluate.stats import paired_difference

    scores: dict = {}
    for name, verdicts in aligned.items():
        scores[f"{name}_alignment_single"] = float(np.mean(verdicts[:n]))
        scores[f"{name}_alignment_two"] = float(np.mean(verdicts[n:]))
    if "vae" in aligned:
        tiny, full = aligned["reconstruction"], aligned["vae"]
        scores["tiny_minus_vae"] = {
            group: paired_difference(tiny[part], full[part]).to_json()
            for group, part in (("single", slice(0, n)), ("two", slice(n, None)))
        }
    return scores


def _levels(decoded) -> np.ndarray:
    """Decoder output in [-1, 1] (NCHW) as [N, H, W, 3] pixel levels, rounded."""
    return ((decoded.clamp(-1, 1).permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).round()


# ---- does the U-Net read its caption? ----------------------------------------------------

# What ``caption_use`` swaps: every colour (or shape) word for the one three places on, and
# each position or relation word for its opposite.
_SWAP_TABLES: dict[str, dict[str, str]] = {
    "color": {c: list(COLORS)[(i + 3) % len(COLORS)] for i, c in enumerate(COLORS)},
    "shape": {s: TRAIN_SHAPES[(i + 3) % len(TRAIN_SHAPES)] for i, s in enumerate(TRAIN_SHAPES)},
    "position": {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "above": "below", "below": "above"},
}  # fmt: skip


def swap_words(caption: str, kind: str) -> str:
    """``caption`` with its ``kind`` words ("color", "shape", "position") swapped."""
    table = _SWAP_TABLES[kind]
    pattern = re.compile(r"\b(" + "|".join(table) + r")\b")
    return pattern.sub(lambda match: table[match.group(1)], caption)


@dataclass
class CaptionUseScores:
    """The U-Net's denoising loss on held-out renders with their true captions, and how much
    it rises when one kind of word in the caption is swapped. A word kind the model ignores
    rises by ~0 however long it trains."""

    model: str
    samples: int
    timesteps: list[int]
    loss: list[float]  # true captions, per timestep
    increase: dict[str, list[float]]  # swap kind -> relative loss increase per timestep
    changed: dict[str, int]  # swap kind -> captions the swap changes (the increase is over these)


def caption_use(
    model: str,
    *,
    unet: str | None = None,
    samples: int = 128,
    timesteps: tuple[int, ...] = (300, 500, 700),
    seed: int = 0,
    batch_size: int = 32,
    device: str = "auto",
) -> CaptionUseScores:
    """How much the U-Net's loss depends on each kind of caption word (colour, shape, position).

    Half the held-out scenes of ``shapes eval`` have one object, half two. They are rendered
    and encoded (latent means), noised at each timestep with the same noise for every caption
    variant, and denoised with the true caption, the caption with one kind of word swapped,
    and the empty caption ("empty": how much the text helps at all).
    """
    import torch
    from diffusers import DDPMScheduler

    from distilsd.errors import InputError
    from distilsd.generate import load_pipeline

    loaded = load_pipeline(model, unet=unet, device=device, safety_checker=False)
    pipe = loaded.pipeline
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    bad = [t for t in timesteps if not 0 <= t < scheduler.config.num_train_timesteps]
    if bad or samples < 2:
        raise InputError(
            f"timesteps must lie in [0, {scheduler.config.num_train_timesteps}) and samples be >= 2"
            f" (got timesteps {list(timesteps)}, samples {samples})"
        )
    scenes = heldout_scenes(1, samples // 2) + heldout_scenes(2, samples - samples // 2)
    captions = {"true": [scene.caption for scene in scenes]}
    for kind in _SWAP_TABLES:
        captions[kind] = [swap_words(caption, kind) for caption in captions["true"]]
    captions["empty"] = [""] * len(scenes)
    generator = torch.Generator().manual_seed(seed)
    losses: dict[str, list[torch.Tensor]] = {variant: [] for variant in captions}  # [timesteps, samples]
    with torch.no_grad():
        pixels = np.stack([np.asarray(render(scene), dtype=np.float32) for scene in scenes])
        pixels = torch.from_numpy(pixels / 127.5 - 1.0).permute(0, 3, 1, 2).to(loaded.device, loaded.dtype)
        latents = (
            torch.cat([pipe.vae.encode(part).latent_dist.mean for part in pixels.split(batch_size)])
            * pipe.vae.config.scaling_factor
        )
        embeddings = {}
        for variant, texts in captions.items():
            ids = pipe.tokenizer(
                texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                truncation=True, return_tensors="pt",
            ).input_ids  # fmt: skip
            embeddings[variant] = torch.cat(
                [pipe.text_encoder(part.to(loaded.device))[0] for part in ids.split(batch_size)]
            )
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
            steps = torch.full((len(scenes),), t, dtype=torch.long, device=latents.device)
            noisy = scheduler.add_noise(latents, noise, steps)
            if scheduler.config.prediction_type == "v_prediction":
                target = scheduler.get_velocity(latents, noise, steps)
            else:
                target = noise
            for variant, embedding in embeddings.items():
                per_sample = [
                    (pipe.unet(x, s, encoder_hidden_states=e).sample.float() - y.float()).pow(2).mean(dim=(1, 2, 3))
                    for x, s, e, y in zip(
                        noisy.split(batch_size), steps.split(batch_size),
                        embedding.split(batch_size), target.split(batch_size), strict=True,
                    )
                ]  # fmt: skip
                losses[variant].append(torch.cat(per_sample).cpu())
    true = torch.stack(losses["true"])
    increase, changed = {}, {}
    for variant in [*_SWAP_TABLES, "empty"]:
        mask = torch.tensor([a != b for a, b in zip(captions[variant], captions["true"], strict=True)])
        changed[variant] = int(mask.sum())
        swapped = torch.stack(losses[variant])
        increase[variant] = [
            float(swapped[i, mask].mean() / true[i, mask].mean() - 1) if mask.any() else float("nan")
            for i in range(len(timesteps))
        ]
    return CaptionUseScores(
        model=loaded.name,
        samples=len(scenes),
        timesteps=list(timesteps),
        loss=[float(row.mean()) for row in true],
        increase=increase,
        changed=changed,
    )


def caption_use_table(scores: CaptionUseScores) -> str:
    """Markdown: the true captions' loss, then each variant's relative loss increase."""
    lines = [
        "| caption | " + " | ".join(f"t={t}" for t in scores.timesteps) + " | captions changed |",
        "|---" * (len(scores.timesteps) + 2) + "|",
        "| true (loss) | " + " | ".join(f"{v:.4f}" for v in scores.loss) + " | - |",
    ]
    for variant, values in scores.increase.items():
        label = "empty caption" if variant == "empty" else f"{variant} words swapped"
        cells = " | ".join(f"{100 * v:+.1f}%" for v in values)
        lines.append(f"| {label} | {cells} | {scores.changed[variant]} |")
    return "\n".join(lines)
