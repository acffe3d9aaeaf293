"""Training the judge's second stage: the classifier that re-reads every object the heatmap proposes.

The centre-heatmap judge finds objects well but names the shapes the models draw between two
of the eight less well: its first two layers bring 64x64 pixels down to the 16x16 map, and a
small star or a pinched cross is a few pixels wide. Its mistakes on the labelled generated
images were mostly such shapes (a star read as a triangle, a cross as a diamond, a lumpy
circle as a hexagon) and objects whose peak fell just under the detection threshold
(docs/shapes-eval.md). The second stage (:class:`~distilsd.shapes.judge.TwoStageJudge`, in
:mod:`distilsd.shapes.judge` with the rest of how a judge reads) re-reads each proposal from a
40x40 window of the image at full resolution.

This module trains its :class:`~distilsd.shapes.judge.CropClassifier`: on windows of augmented
renders (at object centres, and away from them for "no object") and on windows of labelled
generated images, where the first stage's stray peaks are the "no object" examples it most
needs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distilsd.errors import InputError
from distilsd.shapes.judge import (
    ACCEPT_THRESHOLD,
    CROP_SIZE,
    PROPOSAL_THRESHOLD,
    SECOND_STAGE_FILE,
    CropClassifier,
    TwoStageJudge,
    augment,
    crop_windows,
    decode,
    image_fingerprint,
    images_to_tensor,
    judge_folder,
    judge_name,
    labelled_set_fingerprints,
    load_judge,
    render_batch,
    training_scene,
    training_styles,
)
from distilsd.shapes.world import COLORS, SHAPES

logger = logging.getLogger(__name__)

# A window at least this far (fraction of the side) from every object's centre holds no object centred
# in it; positives are jittered by up to 1.5 px, as the first stage's centres are off by about that.
OFF_CENTRE = 0.11
CENTRE_JITTER = 1.5 / 64

COLOR_NAMES, SHAPE_NAMES = list(COLORS), list(SHAPES)


# ---- training -------------------------------------------------------------------------------


def window_examples(
    objects_per_image: list[list[tuple[str, str, float, float]]], rng: random.Random
) -> tuple[list[tuple[int, float, float]], list[tuple[int, int, int]]]:
    """Where to cut windows from a batch, and what each holds: (centres, targets (object, colour, shape)).

    One window per object at its centre (jittered), and one "no object" window per image:
    half of them beside an object (0.11-0.3 from its centre, on its outline or just off
    it, where a first-stage peak on a large object's arm sits), half anywhere clear of
    every centre. Colour or shape -1: not a class of the eight (learnt as an object only).
    """
    centres, targets = [], []
    for b, objects in enumerate(objects_per_image):
        for color, shape, x, y in objects:
            centres.append(
                (
                    b,
                    x + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER),
                    y + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER),
                )
            )
            targets.append(
                (
                    1,
                    COLOR_NAMES.index(color) if color in COLOR_NAMES else -1,
                    SHAPE_NAMES.index(shape) if shape in SHAPE_NAMES else -1,
                )
            )
        for _ in range(20):  # a few tries to land clear of every centre
            if objects and rng.random() < 0.5:
                _, _, ox, oy = rng.choice(objects)
                distance, angle = rng.uniform(OFF_CENTRE + 0.01, 0.3), rng.uniform(0, 2 * math.pi)
                x, y = ox + distance * math.cos(angle), oy + distance * math.sin(angle)
            else:
                x, y = rng.uniform(0.03, 0.97), rng.uniform(0.03, 0.97)
            if (
                0 <= x <= 1
                and 0 <= y <= 1
                and all(math.hypot(x - o[2], y - o[3]) > OFF_CENTRE for o in objects)
            ):
                centres.append((b, x, y))
                targets.append((0, -1, -1))
                break
    return centres, targets


def stray_proposals(
    first_stage: nn.Module, images: torch.Tensor, objects_per_image
) -> list[tuple[int, float, float]]:
    """The first stage's proposals on labelled images that are no labelled object: "no object" windows."""
    stray = []
    for start in range(0, len(images), 256):
        with torch.no_grad():
            cells, _ = first_stage(images[start : start + 256])
        for b, found in enumerate(decode(cells, PROPOSAL_THRESHOLD * 2 / 3), start=start):
            for d in found:
                if all(math.hypot(d.x - o[2], d.y - o[3]) > OFF_CENTRE for o in objects_per_image[b]):
                    stray.append((b, d.x, d.y))
    return stray


def labelled_objects(folder: str | Path, exclude: set[str]) -> tuple[torch.Tensor, list[list[tuple]], int]:
    """A labelled folder's clear images [N, 3, 64, 64], their objects (colour, shape, x, y), and how many were left out."""
    from PIL import Image

    from distilsd.shapes.labels import load_labels

    folder = Path(folder)
    images, objects, dropped = [], [], 0
    for label in load_labels(folder):
        if not label.clear:
            continue
        image = Image.open(folder / label.file).convert("RGB")
        if image_fingerprint(image) in exclude:
            dropped += 1
            continue
        images.append(image)
        objects.append([tuple(o) for o in label.objects])
    if not images:
        return torch.zeros(0, 3, 64, 64), [], dropped
    return images_to_tensor(images), objects, dropped


@dataclass
class SecondStageReport:
    steps: int
    render_windows_per_step: float
    generated_windows: int  # cut once from the labelled generated images
    stray_proposals: int  # of those, "no object" windows at first-stage peaks
    generated_dropped: int  # identical to images of the shipped labelled sets


def train_second_stage(
    output_dir: str | Path,
    *,
    judge_dir: str | Path | None = None,
    generated: list[str | Path] = (),
    train_images: int = 16000,
    epochs: int = 2,
    batch_size: int = 32,
    generated_per_batch: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    loose_fraction: float = 0.0,
    large_fraction: float = 0.2,
    rounded_hexagon_fraction: float = 0.0,
    progress: bool = True,
) -> SecondStageReport:
    """Train a second stage on top of the judge in ``judge_dir`` (None: the one-stage judge) and save both.

    ``output_dir`` gets a copy of the first stage's files and ``second_stage.safetensors``;
    its ``judge_config.json`` names the second stage, so :func:`~distilsd.shapes.judge.load_judge`
    reads images with both. Each batch holds windows of ``batch_size`` augmented renders
    (training scenes as the judge's, drawn with ``loose_fraction`` / ``large_fraction`` /
    ``rounded_hexagon_fraction`` as in :func:`~distilsd.shapes.judge.train_judge`) and
    ``generated_per_batch`` windows drawn from the labelled generated images (``generated``
    folders; never the shipped labelled sets, and images identical to theirs are left out).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from distilsd.shapes.labels import SHIPPED_LABELLED_DIRS

    for flag, value in {
        "--loose-fraction": loose_fraction,
        "--large-fraction": large_fraction,
        "--rounded-hexagons": rounded_hexagon_fraction,
    }.items():
        if not 0 <= value <= 1:
            raise InputError(f"{flag} {value} is not a fraction", hint="give a number from 0 to 1")
    shipped = {folder.resolve() for folder in SHIPPED_LABELLED_DIRS}
    if any(Path(folder).resolve() in shipped for folder in generated):
        raise InputError("the judge is checked on the shipped labelled sets: it must not train on them")
    # The first stage is a heatmap judge; given a two-stage one, its heatmap is kept and its second stage replaced.
    first_stage_name = judge_name("one-stage" if judge_dir is None else judge_dir)
    judge_dir = judge_folder("one-stage" if judge_dir is None else judge_dir)
    first_stage = load_judge(judge_dir)
    if isinstance(first_stage, TwoStageJudge):
        first_stage = first_stage.first_stage  # a new second stage replaces the old one

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(f"second-stage-{seed}")
    scenes = [training_scene(i, large_fraction=large_fraction) for i in range(train_images)]
    styles = [
        training_styles(scene, i, loose_fraction, rounded_hexagon_fraction) for i, scene in enumerate(scenes)
    ]
    renders, _ = render_batch(scenes, styles)
    render_objects = [[(o.color, o.shape, o.x, o.y) for o in scene.objects] for scene in scenes]

    # Windows of the generated images are cut once (no augmentation: they are what the models draw).
    checked_on = labelled_set_fingerprints() if generated else set()
    generated_windows, generated_targets, stray_count, dropped = [], [], 0, 0
    for folder in dict.fromkeys(Path(f).resolve() for f in generated):  # a folder given twice counts once
        images, objects, folder_dropped = labelled_objects(folder, checked_on)
        dropped += folder_dropped
        if not len(images):
            continue
        centres, targets = window_examples(objects, rng)
        stray = stray_proposals(first_stage, images, objects)
        stray_count += len(stray)
        generated_windows.append(crop_windows(images, centres + stray))
        generated_targets.append(torch.tensor(targets + [(0, -1, -1)] * len(stray)))
    if dropped:
        logger.warning(
            "left out %d generated training image(s) identical to images of the shipped labelled sets",
            dropped,
        )
    has_generated = bool(generated_windows)
    if has_generated:
        generated_windows, generated_targets = torch.cat(generated_windows), torch.cat(generated_targets)

    classifier = CropClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(train_images / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    n_colors = len(COLOR_NAMES)
    render_windows = 0
    bar = tqdm(total=steps, desc="second stage", disable=not progress)
    classifier.train()
    for _ in range(epochs):
        order = torch.randperm(train_images, generator=generator)
        for start in range(0, train_images, batch_size):
            index = order[start : start + batch_size]
            images = augment(renders[index], generator)
            centres, targets = window_examples([render_objects[i] for i in index.tolist()], rng)
            windows, wanted = crop_windows(images, centres), torch.tensor(targets)
            render_windows += len(windows)
            if has_generated:
                pick = torch.randint(len(generated_windows), (generated_per_batch,), generator=generator)
                windows = torch.cat([windows, generated_windows[pick]])
                wanted = torch.cat([wanted, generated_targets[pick]])
            mirror = torch.rand(len(windows), generator=generator) < 0.5  # no shape changes when mirrored
            windows = torch.where(mirror[:, None, None, None], windows.flip(3), windows)
            logits = classifier(windows)
            loss_object = nn.functional.binary_cross_entropy_with_logits(logits[:, 0], wanted[:, 0].float())
            named_color = (wanted[:, 0] == 1) & (wanted[:, 1] >= 0)
            named_shape = (wanted[:, 0] == 1) & (wanted[:, 2] >= 0)
            loss_color = nn.functional.cross_entropy(
                logits[named_color, 1 : 1 + n_colors], wanted[named_color, 1]
            )
            loss_shape = nn.functional.cross_entropy(
                logits[named_shape, 1 + n_colors :], wanted[named_shape, 2]
            )
            loss = loss_object + loss_color + loss_shape
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(
                object=f"{loss_object.item():.3f}",
                color=f"{loss_color.item():.3f}",
                shape=f"{loss_shape.item():.3f}",
            )
    bar.close()
    classifier.eval()

    # The first stage's files are copied beside the second stage; every file is staged and renamed into
    # place, the config last, so an interrupted run leaves no half-written judge.
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((judge_dir / "judge_config.json").read_text())
    if output_dir.resolve() != judge_dir.resolve():
        for name in config.get("members", ["judge.safetensors"]):
            staged = output_dir / f".{name}.tmp"
            shutil.copyfile(judge_dir / name, staged)
            os.replace(staged, output_dir / name)
    staged = output_dir / f".{SECOND_STAGE_FILE}.tmp"
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, staged)
    os.replace(staged, output_dir / SECOND_STAGE_FILE)
    report = SecondStageReport(
        steps=steps,
        render_windows_per_step=render_windows / steps,
        generated_windows=len(generated_windows) if has_generated else 0,
        stray_proposals=stray_count,
        generated_dropped=dropped,
    )
    config["second_stage"] = {
        "weights": SECOND_STAGE_FILE,
        "crop_size": CROP_SIZE,
        "proposal_threshold": PROPOSAL_THRESHOLD,
        "accept_threshold": ACCEPT_THRESHOLD,
        "first_stage": first_stage_name,
        "train_images": train_images,
        "epochs": epochs,
        "seed": seed,
        "generated": [str(folder) for folder in generated],
        "loose_fraction": loose_fraction,
        "large_fraction": large_fraction,
        "rounded_hexagon_fraction": rounded_hexagon_fraction,
        "command": f"distilsd shapes train-second-stage --train-images {train_images} --epochs {epochs} --seed {seed}"
        + (f" --judge {first_stage_name}" if first_stage_name != "one-stage" else "")
        + "".join(f" --generated {folder}" for folder in generated)
        + (f" --loose-fraction {loose_fraction}" if loose_fraction else "")
        + (f" --large-fraction {large_fraction}" if large_fraction != 0.2 else "")
        + (f" --rounded-hexagons {rounded_hexagon_fraction}" if rounded_hexagon_fraction else ""),
        "report": report.__dict__,
    }
    staged = output_dir / ".judge_config.json.tmp"
    staged.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(staged, output_dir / "judge_config.json")
    return report
