"""Scoring personalisation on the Shapes world: does a model draw the held-out hexagon now?

``hexagon`` is in the Shapes world but in no training set (:data:`HELD_OUT_SHAPES`), and the
judge knows it. The prompts are the held-out prompt style with the shape fixed to a
hexagon ("a red hexagon at the top", "a small cyan hexagon", ...), drawn from a seed no
training set uses. An image counts when the judge finds a hexagon of the prompt's colour;
``aligned`` also asks for the stated position. Intervals are Wilson 95% binomial intervals.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

from distilsd.shapes.world import HELD_OUT_SHAPES, Scene, sample_scene

SUBJECT_PROMPT_SEED = 404


def subject_scenes(
    count: int, shape: str = HELD_OUT_SHAPES[0], seed: int = SUBJECT_PROMPT_SEED
) -> list[Scene]:
    """``count`` single-object scenes of ``shape`` in the held-out prompt style."""
    return [sample_scene(random.Random(f"subject-{seed}-{shape}-{i}"), 1, (shape,)) for i in range(count)]


def wilson_interval(successes: int, total: int) -> tuple[float, float]:
    """The Wilson score interval (95%) of a binomial proportion; (nan, nan) for no trials."""
    from distilsd.evaluate.stats import proportion

    if total == 0:
        return (float("nan"), float("nan"))
    estimate = proportion(successes, total)
    return (estimate.low, estimate.high)


@dataclass
class SubjectScores:
    model: str
    loras: list[str]
    prompts: int
    shape: str
    right_shape_and_colour: float  # the judge finds a `shape` of the prompt's colour
    interval: tuple[float, float]
    aligned: float  # ... also where the prompt says
    steps: int  # what the images were sampled with (an LCM model's own unless given)
    guidance_scale: float
    single_object_alignment: float | None = None  # the usual held-out single-object prompts
    single_object_interval: tuple[float, float] | None = None
    # With compare_base: the model without its LoRAs on the same prompts and seeds, and the
    # paired differences (LoRA minus base) with their bootstrap intervals.
    base: dict | None = None
    subject_gain: dict | None = None
    prior_change: dict | None = None
    # The judge that read the images: 'two-stage', 'one-stage' or a folder; None in records
    # written before the two-stage judge was the default (2026-12-04), which the one-stage judge read.
    judge: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class _Verdicts:
    name: str
    found: list[bool]  # per subject prompt: a `shape` of the prompt's colour
    aligned: list[bool]  # ... also at the stated position
    prior: list[bool]  # per usual single-object prompt: aligned


def _judge_prompts(
    model, output_dir, scenes, prior, shape, settings, *, loras, unet, scheduler, device, progress, judge
) -> _Verdicts:
    from PIL import Image

    from distilsd.generate import PromptSpec, generate_images, load_pipeline, plan_jobs
    from distilsd.shapes.captions import parse_caption
    from distilsd.shapes.judge import is_aligned, load_judge, read_images

    specs = [PromptSpec(s.caption, name=f"{shape}-{i:04d}") for i, s in enumerate(scenes)]
    specs += [PromptSpec(s.caption, name=f"1obj-{i:04d}") for i, s in enumerate(prior)]
    loaded = load_pipeline(
        model, unet=unet, scheduler=scheduler, device=device, safety_checker=False, loras=list(loras)
    )
    records = generate_images(loaded, plan_jobs(specs, settings), settings, output_dir, progress=progress)
    readings = read_images(load_judge(judge), [Image.open(r.path) for r in records])
    subject, usual = readings[: len(scenes)], readings[len(scenes) :]
    verdicts = _Verdicts(
        name=loaded.name,
        found=[r.best((s.objects[0].color, shape)) is not None for r, s in zip(subject, scenes, strict=True)],
        aligned=[is_aligned(r, parse_caption(s.caption)) for r, s in zip(subject, scenes, strict=True)],
        prior=[is_aligned(r, parse_caption(s.caption)) for r, s in zip(usual, prior, strict=True)],
    )
    _write_records(Path(output_dir), records, readings, verdicts, len(scenes))
    return verdicts


def _write_records(output_dir: Path, records, readings, verdicts: _Verdicts, subject_count: int) -> None:
    """``judged.jsonl`` beside the images, as ``shapes eval`` writes it: per image its file, prompt,
    seed, what the judge read and the verdicts, so any verdict can be checked against the image."""
    import json

    from distilsd.shapes.evaluate import RECORDS_NAME, write_text_atomically

    lines = []
    for i, (record, reading) in enumerate(zip(records, readings, strict=True)):
        entry = {"file": Path(record.path).name, "prompt": record.prompt, "seed": record.seed}
        if i < subject_count:
            entry.update(kind="subject", found=verdicts.found[i], aligned=verdicts.aligned[i])
        else:
            entry.update(kind="usual", aligned=verdicts.prior[i - subject_count])
        lines.append(json.dumps({**entry, "read": reading.to_json()}))
    write_text_atomically(output_dir / RECORDS_NAME, "\n".join(lines) + "\n")


def _share(verdicts: list[bool]) -> tuple[float, tuple[float, float]]:
    return sum(verdicts) / len(verdicts), wilson_interval(sum(verdicts), len(verdicts))


def _paired(first: list[bool], second: list[bool]) -> dict:
    from distilsd.evaluate.stats import paired_difference

    return paired_difference(first, second).to_json()


def score_subject(
    model: str,
    output_dir: str | Path,
    *,
    loras: list[str] | tuple[str, ...] = (),
    unet: str | None = None,
    prompts: int = 100,
    shape: str = HELD_OUT_SHAPES[0],
    prompt_seed: int = SUBJECT_PROMPT_SEED,
    prior_prompts: int = 0,
    compare_base: bool = False,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    progress: bool = True,
    judge: str | Path | None = None,
) -> SubjectScores:
    """Generate the subject prompts (and ``prior_prompts`` usual single-object ones) and judge them.

    ``compare_base`` also runs the model without its LoRAs on the same prompts and seeds (images
    in ``output_dir/base``) and reports the paired differences: how much the LoRA taught
    (``subject_gain``) and how much it moved the usual prompts (``prior_change``, what prior
    preservation is meant to keep near 0). ``prompt_seed`` draws another prompt set (to choose
    settings on, keeping the reported set, 404, unseen). Steps and guidance default to
    ``generate``'s: 25 and the model's guidance, or an LCM model's (or LCM-LoRA's) own.
    ``judge``: a built-in judge's name or a folder (``shapes train-judge -o``); None: the default, two-stage.
    """
    from distilsd.errors import InputError
    from distilsd.generate import DEFAULT_STEPS, GenerationSettings
    from distilsd.models import default_guidance
    from distilsd.schedulers import apply_few_step_defaults, few_step_defaults
    from distilsd.shapes.evaluate import heldout_scenes
    from distilsd.shapes.judge import judge_name

    if prompts < 1 or prior_prompts < 0:
        raise InputError(
            f"prompts must be at least 1 and prior prompts at least 0 (got {prompts}, {prior_prompts})"
        )
    if compare_base and not loras:
        raise InputError("--compare-base compares a LoRA with its base model: give --lora")
    scenes = subject_scenes(prompts, shape, seed=prompt_seed)
    prior = heldout_scenes(1, prior_prompts) if prior_prompts else []
    num_inference_steps, guidance_scale, scheduler = apply_few_step_defaults(
        few_step_defaults(model, loras), num_inference_steps, guidance_scale, None
    )
    settings = GenerationSettings(
        num_inference_steps=DEFAULT_STEPS if num_inference_steps is None else num_inference_steps,
        guidance_scale=default_guidance(model) if guidance_scale is None else guidance_scale,
        seed=seed,
        batch_size=batch_size,
    )
    settings.validate()
    # The base model of --compare-base samples as the LoRA run does: a paired comparison.
    options = {"unet": unet, "scheduler": scheduler, "device": device, "progress": progress, "judge": judge}
    tuned = _judge_prompts(model, output_dir, scenes, prior, shape, settings, loras=loras, **options)
    found, found_interval = _share(tuned.found)
    scores = SubjectScores(
        model=tuned.name,
        loras=list(loras),
        prompts=prompts,
        shape=shape,
        right_shape_and_colour=found,
        interval=found_interval,
        aligned=sum(tuned.aligned) / prompts,
        steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        judge=judge_name(judge),
    )
    if prior:
        scores.single_object_alignment, scores.single_object_interval = _share(tuned.prior)
    if compare_base:
        base = _judge_prompts(
            model, Path(output_dir) / "base", scenes, prior, shape, settings, loras=(), **options
        )
        base_found, base_interval = _share(base.found)
        scores.base = {"model": base.name, "right_shape_and_colour": base_found, "interval": base_interval}
        scores.subject_gain = _paired(tuned.found, base.found)
        if prior:
            kept, kept_interval = _share(base.prior)
            scores.base.update(single_object_alignment=kept, single_object_interval=kept_interval)
            scores.prior_change = _paired(tuned.prior, base.prior)
    return scores
