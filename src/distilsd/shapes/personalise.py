"""Scoring personalisation on the Shapes world: does a model draw the held-out hexagon now?

``hexagon`` is in the Shapes world but in no training set (:data:`HELD_OUT_SHAPES`), and the
shipped judge knows it. The prompts are the held-out prompt style with the shape fixed to a
hexagon ("a red hexagon at the top", "a small cyan hexagon", ...), drawn from a seed no
training set uses. An image counts when the judge finds a hexagon of the prompt's colour;
``aligned`` also asks for the stated position. Intervals are Wilson 95% binomial intervals.
"""

from __future__ import annotations

import math
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


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% at z = 1.96)."""
    if total == 0:
        return (float("nan"), float("nan"))
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class SubjectScores:
    model: str
    loras: list[str]
    prompts: int
    shape: str
    right_shape_and_colour: float  # the judge finds a `shape` of the prompt's colour
    interval: tuple[float, float]
    aligned: float  # ... also where the prompt says
    single_object_alignment: float | None = None  # the usual held-out single-object prompts
    single_object_interval: tuple[float, float] | None = None

    def to_json(self) -> dict:
        return asdict(self)


def score_subject(
    model: str,
    output_dir: str | Path,
    *,
    loras: list[str] | tuple[str, ...] = (),
    unet: str | None = None,
    prompts: int = 100,
    shape: str = HELD_OUT_SHAPES[0],
    prior_prompts: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    progress: bool = True,
) -> SubjectScores:
    """Generate the subject prompts (and ``prior_prompts`` usual single-object ones) and judge them."""
    from PIL import Image

    from distilsd.generate import GenerationSettings, PromptSpec, generate_images, load_pipeline, plan_jobs
    from distilsd.models import default_guidance
    from distilsd.shapes.captions import parse_caption
    from distilsd.shapes.evaluate import heldout_scenes
    from distilsd.shapes.judge import is_aligned, load_judge, read_images

    scenes = subject_scenes(prompts, shape)
    prior = heldout_scenes(1, prior_prompts) if prior_prompts else []
    specs = [PromptSpec(s.caption, name=f"{shape}-{i:04d}") for i, s in enumerate(scenes)]
    specs += [PromptSpec(s.caption, name=f"1obj-{i:04d}") for i, s in enumerate(prior)]
    settings = GenerationSettings(
        num_inference_steps=num_inference_steps,
        guidance_scale=default_guidance(model) if guidance_scale is None else guidance_scale,
        seed=seed,
        batch_size=batch_size,
    )
    settings.validate()
    loaded = load_pipeline(model, unet=unet, device=device, safety_checker=False, loras=list(loras))
    records = generate_images(loaded, plan_jobs(specs, settings), settings, output_dir, progress=progress)
    readings = read_images(load_judge(), [Image.open(r.path) for r in records])
    found = [
        reading.best((scene.objects[0].color, shape)) is not None
        for reading, scene in zip(readings[:prompts], scenes, strict=True)
    ]
    aligned = [
        is_aligned(reading, parse_caption(scene.caption))
        for reading, scene in zip(readings[:prompts], scenes, strict=True)
    ]
    scores = SubjectScores(
        model=loaded.name,
        loras=list(loras),
        prompts=prompts,
        shape=shape,
        right_shape_and_colour=sum(found) / prompts,
        interval=wilson_interval(sum(found), prompts),
        aligned=sum(aligned) / prompts,
    )
    if prior:
        kept = [
            is_aligned(reading, parse_caption(scene.caption))
            for reading, scene in zip(readings[prompts:], prior, strict=True)
        ]
        scores.single_object_alignment = sum(kept) / len(kept)
        scores.single_object_interval = wilson_interval(sum(kept), len(kept))
    return scores
