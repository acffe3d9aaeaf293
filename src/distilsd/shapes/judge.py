"""The Shapes judge: a small CNN detector that says which (color, shape) objects an image holds, and where.

It is trained on rendered scenes with their ground-truth attributes, augmented to look like
what the Shapes models generate (soft edges, colour bleeding past the outline, slightly
warped shapes, blotchy backgrounds, noise), and scores generated images:

- **alignment**: the fraction of prompts whose objects (color + shape), and the position or
  relation the prompt states, the judge finds; ``exact`` also refuses images with objects
  the prompt did not ask for, ``contains`` does not (see :func:`is_aligned`);
- **Shapes-FID**: the Fréchet distance between the judge's penultimate features of
  generated and of rendered images (the Inception-FID recipe on a network that knows this
  world).

It is a centre-heatmap detector (CenterNet's recipe): a 16x16 map of "an object's centre is
near here", trained on Gaussian bumps rather than one-hot cells, plus per-cell colour, shape
and centre offset learnt on every cell near a centre. An object centred on the boundary
between two cells is seen by both, so there is no blind spot at cell edges (the 8x8 grid
judge it replaced missed objects centred within 0.01 of a multiple of 1/8). Each local peak
of the map above :data:`DETECTION_THRESHOLD` is one object, so extra or repeated objects are
counted.

A judge can have a **second stage** (:class:`TwoStageJudge`; trained by
:mod:`distilsd.shapes.second_stage`): every heatmap peak from :data:`PROPOSAL_THRESHOLD` is a
proposal, and a small CNN (:class:`CropClassifier`) reads a 40x40 window of the image around it
at full resolution, accepts it as an object or not, and names its colour and shape; the heatmap
still places the objects and gives the Shapes-FID features.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distilsd.errors import InputError
from distilsd.shapes.captions import PromptTarget
from distilsd.shapes.labels import SHIPPED_LABELLED_DIRS
from distilsd.shapes.world import (
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapeStyle,
    render,
    scene_for_index,
)

logger = logging.getLogger(__name__)

PAIRS = [(color, shape) for color in COLORS for shape in SHAPES]
PAIR_INDEX = {pair: i for i, pair in enumerate(PAIRS)}
# The heatmap judge alone ("one-stage"): it finds and places objects, and its features give Shapes-FID.
JUDGE_DIR = Path(__file__).parent / "assets" / "judge"
# The same heatmap with a second stage that re-reads each object from its pixels (shapes/second_stage.py).
TWO_STAGE_JUDGE_DIR = Path(__file__).parent / "assets" / "judge-two-stage"
BUILTIN_JUDGES = {"two-stage": TWO_STAGE_JUDGE_DIR, "one-stage": JUDGE_DIR}
# What reads images when no judge is named: the two-stage judge, which reads generated images
# better than the heatmap alone (docs/shapes-eval.md#the-judges-second-stage-2026-12-04).
DEFAULT_JUDGE = "two-stage"
# Data seeds: the judge trains on one, is checked on another; prompt sets use others again.
JUDGE_TRAIN_SEED = 101
JUDGE_HELDOUT_SEED = 202
# Where the extra objects of the judge's three-object training scenes come from.
JUDGE_EXTRA_SEED = 111

GRID = 16  # heatmap cells per side (4 px each)
HEAT_SIGMA = 0.75  # the Gaussian bump around a centre, in cells
# A cell learns colour, shape and offset where the bump is at least this high (within ~0.9 cells).
ATTRIBUTE_HEAT = 0.5
DETECTION_THRESHOLD = 0.5  # an object is a local heatmap peak at least this high
# Peaks closer than this (fraction of the side) are one object: scenes keep objects >= 0.26 apart.
MERGE_DISTANCE = 0.1
NUM_COLORS, NUM_SHAPES = len(COLORS), len(SHAPES)
ALIGNMENT_MODES = ("exact", "contains")


class ShapesJudge(nn.Module):
    """A small centre-heatmap detector over a 16x16 map (CenterNet-style).

    Each cell predicts: how close an object's centre is (1 logit), its color (8 logits),
    its shape (8 logits) and the centre's offset from the cell's corner (2, in cells, from
    -0.5 to 1.5 so that a neighbouring cell can point at it). The convolutions are
    translation-equivariant, so this learns from few renders what a global classifier
    struggles with.
    """

    def __init__(self, image_size: int = 64):
        super().__init__()
        self.image_size = image_size

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.SiLU(),
                nn.Conv2d(cout, cout, 3, stride=2, padding=1),
                nn.BatchNorm2d(cout),
                nn.SiLU(),
            )

        def dilated(cin: int, cout: int, dilation: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation), nn.BatchNorm2d(cout), nn.SiLU()
            )

        self.body = nn.Sequential(block(3, 32), block(32, 64))  # 64 -> 16
        # Context: a large shape spans up to 8 cells of 4 px; dilations 1, 2, 4 see 15 cells.
        self.context = nn.Sequential(dilated(64, 96, 1), dilated(96, 96, 2), dilated(96, 96, 4))
        self.head = nn.Conv2d(96, 1 + NUM_COLORS + NUM_SHAPES + 2, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, 64, 64] in [0, 1] -> (cell predictions [B, 19, 16, 16], features [B, 192])."""
        grid = self.context(self.body(images * 2 - 1))
        features = torch.cat([grid.mean(dim=(2, 3)), grid.amax(dim=(2, 3))], dim=1)  # Shapes-FID features
        return self.head(grid), features


class JudgeEnsemble(nn.Module):
    """Judges trained alike from different seeds (``train-judge --members N``), read as one.

    Their centre heatmaps and their colour and shape probabilities are averaged cell by cell
    (and put back as logits, so :func:`decode` reads the result as it reads one judge); the
    centre offsets are averaged as logits. The Shapes-FID features are the first member's, so
    an ensemble whose first member is a single judge gives that judge's Shapes-FID.
    """

    def __init__(self, members: list[ShapesJudge]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heat, colors, shapes, offsets = 0.0, 0.0, 0.0, 0.0
        for k, member in enumerate(self.members):
            cells, member_features = member(images)
            if k == 0:
                features = member_features
            heat = heat + torch.sigmoid(cells[:, :1])
            colors = colors + torch.softmax(cells[:, 1 : 1 + NUM_COLORS], dim=1)
            shapes = shapes + torch.softmax(cells[:, 1 + NUM_COLORS : 1 + NUM_COLORS + NUM_SHAPES], dim=1)
            offsets = offsets + cells[:, -2:]
        count = len(self.members)
        heat = (heat / count).clamp(1e-6, 1 - 1e-6)
        cells = torch.cat(
            [torch.logit(heat), (colors / count).log(), (shapes / count).log(), offsets / count], dim=1
        )
        return cells, features


@dataclass
class Detection:
    """One object the judge reads: its colour and shape, centre (fractions of the side), and how sure it is."""

    color: str
    shape: str
    x: float
    y: float
    probability: float  # objectness x colour probability x shape probability
    objectness: float  # the heatmap peak

    @property
    def pair(self) -> tuple[str, str]:
        return (self.color, self.shape)


def decode(cells: torch.Tensor, threshold: float = DETECTION_THRESHOLD) -> list[list[Detection]]:
    """Cell predictions [B, 19, 16, 16] -> the objects of each image, most certain first.

    An object is a local maximum (3x3) of the heatmap at or above ``threshold``; two peaks
    closer than :data:`MERGE_DISTANCE` (a centre on a cell boundary lights both cells
    equally) are one object. Its colour and shape are the peak cell's most likely ones.
    """
    heat = torch.sigmoid(cells[:, 0])  # [B, 16, 16]
    peaks = (heat == nn.functional.max_pool2d(heat[:, None], 3, stride=1, padding=1)[:, 0]) & (
        heat >= threshold
    )
    colors = torch.softmax(cells[:, 1 : 1 + NUM_COLORS], dim=1)  # [B, 8c, 16, 16]
    shapes = torch.softmax(cells[:, 1 + NUM_COLORS : 1 + NUM_COLORS + NUM_SHAPES], dim=1)
    offsets = torch.sigmoid(cells[:, -2:]) * 2 - 0.5  # [B, 2, 16, 16]: x, y from the cell's corner, in cells
    color_names, shape_names = list(COLORS), list(SHAPES)
    results = []
    for b in range(cells.shape[0]):
        found: list[Detection] = []
        rows, cols = torch.nonzero(peaks[b], as_tuple=True)
        order = torch.argsort(heat[b, rows, cols], descending=True)
        for row, col in zip(rows[order].tolist(), cols[order].tolist()):
            x = (col + float(offsets[b, 0, row, col])) / GRID
            y = (row + float(offsets[b, 1, row, col])) / GRID
            if any(math.hypot(x - d.x, y - d.y) < MERGE_DISTANCE for d in found):
                continue
            color_p, color_i = colors[b, :, row, col].max(dim=0)
            shape_p, shape_i = shapes[b, :, row, col].max(dim=0)
            objectness = float(heat[b, row, col])
            found.append(
                Detection(
                    color=color_names[int(color_i)],
                    shape=shape_names[int(shape_i)],
                    x=x,
                    y=y,
                    probability=objectness * float(color_p) * float(shape_p),
                    objectness=objectness,
                )
            )
        results.append(found)
    return results


# ---- the second stage: each proposal re-read from its pixels ---------------------------------

CROP_SIZE = 40  # pixels: a window around a proposed centre; the largest objects drawn are ~44 px across
PROPOSAL_THRESHOLD = 0.3  # first-stage peaks from here are proposals (missed objects peaked at 0.38-0.49)
ACCEPT_THRESHOLD = 0.5  # a proposal is an object where the second stage says so at least this surely
SECOND_STAGE_FILE = "second_stage.safetensors"


class CropClassifier(nn.Module):
    """A small CNN over one 40x40 window: object-centred-here (1 logit), colour (8), shape (8).

    Full resolution up to the first stride (the first stage halves it at once), then three
    strides down to 5x5; the features are the mean over the whole window and over its
    central 3x3, so the object in the middle counts more than a neighbour at the edge.
    """

    def __init__(self):
        super().__init__()

        def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.SiLU()
            )

        self.body = nn.Sequential(
            conv(3, 32),
            conv(32, 32),
            conv(32, 64, 2),
            conv(64, 64),
            conv(64, 128, 2),
            conv(128, 128),
            conv(128, 128, 2),
        )  # 40 -> 5
        self.head = nn.Linear(256, 1 + NUM_COLORS + NUM_SHAPES)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """crops [N, 3, 40, 40] in [0, 1] -> logits [N, 17]: object, 8 colours, 8 shapes."""
        grid = self.body(crops * 2 - 1)
        features = torch.cat([grid.mean(dim=(2, 3)), grid[:, :, 1:4, 1:4].mean(dim=(2, 3))], dim=1)
        return self.head(features)


def crop_windows(images: torch.Tensor, centres: list[tuple[int, float, float]]) -> torch.Tensor:
    """The 40x40 windows of ``images`` [B, 3, 64, 64] around ``centres`` (image index, x, y as fractions).

    The image is padded by repeating its border, so a window at the edge is as large as any.
    """
    half = CROP_SIZE // 2
    size = images.shape[-1]
    padded = nn.functional.pad(images, (half, half, half, half), mode="replicate")
    windows = []
    for b, x, y in centres:
        cx = min(max(int(round(x * size)), 0), size)
        cy = min(max(int(round(y * size)), 0), size)
        windows.append(padded[b, :, cy : cy + CROP_SIZE, cx : cx + CROP_SIZE])
    return torch.stack(windows) if windows else images.new_zeros(0, 3, CROP_SIZE, CROP_SIZE)


@torch.no_grad()
def classify_windows(classifier: CropClassifier, windows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(object probability [N], colour probabilities [N, 8], shape probabilities [N, 8]).

    Each window is read as it is and mirrored left to right (no shape of the eight changes
    with it) and the two readings are averaged.
    """
    n_colors = NUM_COLORS
    logits = classifier(torch.cat([windows, windows.flip(3)]))
    objects = torch.sigmoid(logits[:, 0])
    colors = torch.softmax(logits[:, 1 : 1 + n_colors], dim=1)
    shapes = torch.softmax(logits[:, 1 + n_colors :], dim=1)
    n = len(windows)
    return (
        (objects[:n] + objects[n:]) / 2,
        (colors[:n] + colors[n:]) / 2,
        (shapes[:n] + shapes[n:]) / 2,
    )


class TwoStageJudge(nn.Module):
    """A judge (one or an ensemble) whose proposals a :class:`CropClassifier` re-reads.

    Called like the first stage (cell predictions and Shapes-FID features, both the first
    stage's), so Shapes-FID does not change with the second stage; :meth:`detect` gives the
    objects.
    """

    def __init__(
        self,
        first_stage: nn.Module,
        classifier: CropClassifier,
        proposal_threshold: float = PROPOSAL_THRESHOLD,
        accept_threshold: float = ACCEPT_THRESHOLD,
    ):
        super().__init__()
        self.first_stage = first_stage
        self.classifier = classifier
        self.proposal_threshold = proposal_threshold
        self.accept_threshold = accept_threshold

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first_stage(images)

    @torch.no_grad()
    def detect(self, images: torch.Tensor, cells: torch.Tensor) -> list:
        """The objects of each image: the first stage's proposals the classifier accepts, named by it."""
        proposals = decode(cells, self.proposal_threshold)
        centres = [(b, d.x, d.y) for b, found in enumerate(proposals) for d in found]
        results: list[list[Detection]] = [[] for _ in proposals]
        if not centres:
            return results
        objects, colors, shapes = classify_windows(self.classifier, crop_windows(images, centres))
        heat = [d.objectness for found in proposals for d in found]
        for k, (b, x, y) in enumerate(centres):
            if objects[k] < self.accept_threshold:
                continue
            color_p, color_i = colors[k].max(dim=0)
            shape_p, shape_i = shapes[k].max(dim=0)
            results[b].append(
                Detection(
                    color=list(COLORS)[int(color_i)],
                    shape=list(SHAPES)[int(shape_i)],
                    x=x,
                    y=y,
                    probability=float(objects[k] * color_p * shape_p),
                    objectness=heat[k],
                )
            )
        for found in results:
            found.sort(key=lambda d: d.probability, reverse=True)
        return results


def load_second_stage(folder: Path, first_stage: nn.Module, settings: dict) -> TwoStageJudge:
    """The judge of ``folder`` with the second stage its config names (``settings``: config['second_stage'])."""
    if not isinstance(settings, dict) or not isinstance(settings.get("weights"), str):
        raise InputError(
            f"{folder / 'judge_config.json'}: 'second_stage' does not name its weights file",
            hint="train it again with: distilsd shapes train-second-stage -o FOLDER",
        )
    classifier = load_weights(
        CropClassifier(), folder / settings["weights"], "second-stage", "train-second-stage"
    )
    return TwoStageJudge(
        first_stage,
        classifier,
        proposal_threshold=float(settings.get("proposal_threshold", PROPOSAL_THRESHOLD)),
        accept_threshold=float(settings.get("accept_threshold", ACCEPT_THRESHOLD)),
    ).eval()


# ---- data -----------------------------------------------------------------------------------


def scene_targets(scene: Scene) -> torch.Tensor:
    """Per-cell targets [6, 16, 16]: heat, attribute weight, color index, shape index, x and y offset.

    The heat is a Gaussian bump around each centre with exactly 1 at the cell holding it
    (CenterNet); colour, shape and offset are learnt on every cell where the bump is at
    least :data:`ATTRIBUTE_HEAT`, so either side of a cell boundary reads the object.
    """
    target = torch.zeros(6, GRID, GRID)
    corners = torch.arange(GRID, dtype=torch.float32)  # each cell's top-left corner, in cells
    color_names, shape_names = list(COLORS), list(SHAPES)
    for obj in scene.objects:
        cx, cy = obj.x * GRID, obj.y * GRID
        squared = (corners[None, :] + 0.5 - cx) ** 2 + (corners[:, None] + 0.5 - cy) ** 2  # [row, col]
        bump = torch.exp(-squared / (2 * HEAT_SIGMA**2))
        bump[min(int(cy), GRID - 1), min(int(cx), GRID - 1)] = 1.0
        near = bump >= ATTRIBUTE_HEAT
        target[0] = torch.maximum(target[0], bump)
        target[1][near] = bump[near]
        target[2][near] = float(color_names.index(obj.color))
        target[3][near] = float(shape_names.index(obj.shape))
        target[4][near] = (cx - corners[None, :]).expand(GRID, GRID)[near]
        target[5][near] = (cy - corners[:, None]).expand(GRID, GRID)[near]
    return target


def images_to_tensor(images) -> torch.Tensor:
    """PIL images (any size) -> float tensor [B, 3, 64, 64] in [0, 1]."""
    from PIL import Image

    arrays = [
        np.asarray(
            im.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)
            if im.size != (64, 64)
            else im.convert("RGB"),
            dtype=np.float32,
        )
        / 255.0
        for im in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image [B, C, H, W] with its own Gaussian ``sigma`` [B] (pixels; 0 leaves it)."""
    batch, channels, height, width = images.shape
    taps = torch.arange(-3, 4, dtype=images.dtype)
    kernel_1d = torch.exp(-(taps[None, :] ** 2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))  # [B, 7]
    kernel_1d = kernel_1d / kernel_1d.sum(dim=1, keepdim=True)
    kernel = (kernel_1d[:, :, None] * kernel_1d[:, None, :]).repeat_interleave(channels, 0)[:, None]
    padded = nn.functional.pad(
        images.reshape(1, batch * channels, height, width), (3, 3, 3, 3), mode="replicate"
    )
    return nn.functional.conv2d(padded, kernel, groups=batch * channels).reshape(images.shape)


def _smooth_noise(batch: int, channels: int, coarse: int, generator: torch.Generator) -> torch.Tensor:
    """Low-frequency noise [B, C, 64, 64]: a coarse random grid upsampled smoothly."""
    noise = torch.randn(batch, channels, coarse, coarse, generator=generator)
    return nn.functional.interpolate(noise, size=(64, 64), mode="bicubic", align_corners=True)


def augment(images: torch.Tensor, generator: torch.Generator, rounding_chance: float = 0.4) -> torch.Tensor:
    """Make renders look like what the Shapes models generate, each image with its own draw.

    Generated shapes are slightly warped, with rounded corners and soft edges; colour bleeds past the outline
    (the VAE decodes 4x4-pixel latents); flat backgrounds come out blotchy; and there is
    fine noise and a brightness or colour cast. Shifts stay within ~1.5 px, so the centres of
    the targets still hold.
    """
    batch = images.shape[0]

    def chance(p: float) -> torch.Tensor:
        return (torch.rand(batch, 1, 1, 1, generator=generator) < p).float()

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, *shape, generator=generator)

    out = images
    # Slight shape distortion: a smooth displacement field of up to ~1.5 px.
    identity = torch.eye(2, 3).expand(batch, 2, 3)
    grid = nn.functional.affine_grid(identity, list(out.shape), align_corners=False)
    warp = _smooth_noise(batch, 2, 4, generator).permute(0, 2, 3, 1) * uniform(0, 0.05, 1, 1, 1)
    warped = nn.functional.grid_sample(
        out, grid + warp, mode="bilinear", padding_mode="border", align_corners=False
    )
    keep = chance(0.7)
    out = keep * warped + (1 - keep) * out
    # Rounded corners and thickened thin parts: blurred, then sharpened back (unsharp mask).
    rounded = _gaussian_blur(out, uniform(1.0, 1.8))
    rounded = rounded + uniform(1.0, 2.0, 1, 1, 1) * (
        rounded - _gaussian_blur(rounded, torch.full((batch,), 1.5))
    )
    keep = chance(rounding_chance)  # it makes circles and hexagons alike
    out = keep * rounded.clamp(0, 1) + (1 - keep) * out
    # Soft edges: a Gaussian blur, or a 2x downsample and bilinear upsample (a decoder's softness).
    out = _gaussian_blur(out, uniform(0.0, 1.2) * chance(0.7).flatten())
    halved = nn.functional.interpolate(
        nn.functional.avg_pool2d(out, 2), size=(64, 64), mode="bilinear", align_corners=False
    )
    keep = chance(0.25)
    out = keep * halved + (1 - keep) * out
    # Colour bleed: the chroma (pixel minus its grey level) blurred more than the brightness.
    grey = out.mean(dim=1, keepdim=True)
    bled = grey + _gaussian_blur(out - grey, uniform(0.5, 1.8))
    keep = chance(0.5)
    out = keep * bled + (1 - keep) * out
    # Blotchy backgrounds, a colour cast, brightness and fine noise.
    out = out + chance(0.5) * uniform(0, 0.06, 1, 1, 1) * _smooth_noise(batch, 3, 4, generator)
    out = out * uniform(0.92, 1.08, 3, 1, 1) * uniform(0.85, 1.15, 1, 1, 1)
    out = out + uniform(0, 0.05, 1, 1, 1) * torch.randn(out.shape, generator=generator)
    return out.clamp(0, 1)


def training_scene(
    index: int, extra_fraction: float = 0.25, large_fraction: float = 0.0, clipped_fraction: float = 0.0
) -> Scene:
    """Training scene ``index``: a data-set scene, sometimes with a third object or an object larger than any prompt asks.

    The extra object (kept clear of the others, and possibly the same colour and shape as
    one of them) teaches the judge to count objects a prompt did not ask for, which
    generated images sometimes hold. The models draw 'large' objects up to a radius of
    ~0.33 (the data's largest is 0.25), sometimes running off the edge: a fraction of
    single-object scenes get such a radius. ``clipped_fraction`` of those are moved against the
    left or right edge, up to 0.1 past it, as the models draw 'a large ... on the left' (the
    data keeps every outline inside the image): a hexagon cut by the edge loses a corner and
    the judge took it for a circle.
    """
    import random

    scene = scene_for_index(JUDGE_TRAIN_SEED, index, shapes=SHAPES)
    rng = random.Random(f"judge-extra-{index}")
    if large_fraction > 0 and len(scene.objects) == 1 and rng.random() < large_fraction:
        obj = scene.objects[0]
        obj.radius = rng.uniform(0.25, 0.34)
        low, high = max(0.2, obj.radius - 0.08), min(0.8, 1 - obj.radius + 0.08)
        obj.x, obj.y = min(max(obj.x, low), high), min(max(obj.y, low), high)
        if clipped_fraction > 0 and rng.random() < clipped_fraction:
            past = rng.uniform(0.0, 0.1)  # how far the outline runs off the edge
            obj.x = obj.radius - past if rng.random() < 0.5 else 1 - obj.radius + past
        return scene
    if rng.random() >= extra_fraction:
        return scene
    repeat = rng.random() < 0.3  # a second copy of an object already there
    for attempt in range(20):  # small objects from other scenes, until one fits
        extra = scene_for_index(JUDGE_EXTRA_SEED, index * 20 + attempt, shapes=SHAPES).objects[0]
        extra.radius = min(extra.radius, rng.uniform(*SIZES["small"]))
        if repeat:
            extra.color, extra.shape = scene.objects[0].color, scene.objects[0].shape
        if all(
            math.hypot(extra.x - o.x, extra.y - o.y) > extra.radius + o.radius + 0.04 for o in scene.objects
        ):
            return Scene([*scene.objects, extra], scene.background, None, scene.caption)
    return scene


def training_styles(
    scene: Scene, index: int, loose_fraction: float = 0.0, rounded_hexagon_fraction: float = 0.0
) -> list[ShapeStyle]:
    """How loosely each object of training scene ``index`` is drawn (:class:`ShapeStyle`).

    Like the models' drawings: stars with fatter or thinner arms, crosses with narrower or
    wider arms or as deeply pinched four-pointed sparkles (what the models draw for a small
    cross; labelled a cross by the rules of docs/shapes-eval.md), rounded corners, and
    outlines turned by up to ~10 degrees or stretched by up to ~12% (circles and hexagons
    5%), never enough to turn a square into a diamond or a circle into a hexagon.
    ``rounded_hexagon_fraction``: of hexagons drawn with corners rounded by 0.08-0.18 of the
    radius, as the hexagon LoRAs draw them (`--rounded-hexagons`).
    """
    import random
    from dataclasses import replace

    styles = _loose_styles(scene, index, loose_fraction)
    if rounded_hexagon_fraction <= 0:
        return styles
    # The LoRAs draw large hexagons with rounded corners, which a judge that never saw one reads
    # as circles (docs/shapes-eval.md); a separate stream, so the loose styles stay as they were.
    rng = random.Random(f"judge-rhex-{index}")
    return [
        replace(style, rounding=rng.uniform(0.08, 0.18))
        if obj.shape == "hexagon" and rng.random() < rounded_hexagon_fraction
        else style
        for obj, style in zip(scene.objects, styles, strict=True)
    ]


def _loose_styles(scene: Scene, index: int, loose_fraction: float) -> list[ShapeStyle]:
    import random

    if loose_fraction <= 0:
        return [ShapeStyle()] * len(scene.objects)
    rng = random.Random(f"judge-style-{index}")
    styles = []
    for obj in scene.objects:
        if rng.random() >= loose_fraction:
            styles.append(ShapeStyle())
            continue
        sparkle = obj.shape == "cross" and rng.random() < 0.35
        styles.append(
            ShapeStyle(
                star_inner=rng.uniform(0.36, 0.58),
                cross_width=rng.uniform(0.24, 0.42),
                # Deeply pinched (a diamond's sides are 0.71 of the radius from its centre): blurred, a
                # shallower sparkle is a diamond.
                sparkle=rng.uniform(0.26, 0.36) if sparkle else 0.0,
                rotation=rng.uniform(-0.18, 0.18),
                # A hexagon is 1.15 times as wide as tall: an oval stretched as much is one.
                stretch=rng.uniform(0.95, 1.05)
                if obj.shape in ("circle", "hexagon")
                else rng.uniform(0.89, 1.12),
                # Never a rounded hexagon: it is a circle (the models draw no hexagons; renders do).
                rounding=rng.uniform(0.04, 0.2) if rng.random() < 0.5 and obj.shape != "hexagon" else 0.0,
            )
        )
    return styles


def render_batch(
    scenes: list[Scene], styles: list[list[ShapeStyle]] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    styles = styles or [None] * len(scenes)
    images = images_to_tensor(
        [render(scene, styles=style) for scene, style in zip(scenes, styles, strict=True)]
    )
    return images, torch.stack([scene_targets(scene) for scene in scenes])


def image_fingerprint(image) -> str:
    """SHA-1 of an image's RGB pixels: the same picture gives the same fingerprint whatever its PNG encoding."""
    import hashlib

    return hashlib.sha1(image.convert("RGB").tobytes()).hexdigest()


def labelled_set_fingerprints() -> set[str]:
    """Fingerprints of every image in the shipped labelled sets, which the judge is checked on."""
    from PIL import Image

    from distilsd.shapes.labels import load_labels

    return {
        image_fingerprint(Image.open(folder / label.file))
        for folder in SHIPPED_LABELLED_DIRS
        for label in load_labels(folder)
    }


def labelled_scenes(
    folder: str | Path, exclude: set[str] = frozenset()
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Generated images with labels (a labelled folder, e.g. pseudo-labelled) as training images and targets.

    Only images labelled clear are used; an object's size does not enter the targets. Images
    whose fingerprint is in ``exclude`` are left out, and their number is returned third:
    ``shapes eval`` draws every prompt from the same seed, so a prompt that another prompt set
    repeats gives the very same image, and a judge must not train on an image it is checked on.
    """
    from PIL import Image

    from distilsd.shapes.labels import load_labels

    folder = Path(folder)
    labels, images = [], []
    dropped = 0
    for label in load_labels(folder):
        if not label.clear:
            continue
        image = Image.open(folder / label.file).convert("RGB")
        if image_fingerprint(image) in exclude:
            dropped += 1
            continue
        labels.append(label)
        images.append(image)
    scenes = [
        Scene(
            [ShapeObject(shape, color, "small", x, y, 0.1) for color, shape, x, y in label.objects], "white"
        )
        for label in labels
    ]
    if not scenes:
        return torch.zeros(0, 3, 64, 64), torch.zeros(0, 6, GRID, GRID), dropped
    return images_to_tensor(images), torch.stack([scene_targets(scene) for scene in scenes]), dropped


# ---- training -------------------------------------------------------------------------------


@dataclass
class JudgeTrainingReport:
    steps: int
    train_images: int
    heldout_scene_accuracy: float  # exact set of objects found, and each within 0.1 of its centre
    heldout_caption_alignment: float  # the renders' own captions judged aligned (exact)
    heldout_images: int


def _focal_heat_loss(logits: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss: cells near a centre are barely punished for firing."""
    probability = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    positive = heat >= 1.0
    positive_loss = -((1 - probability) ** 2) * torch.log(probability)
    negative_loss = -((1 - heat) ** 4) * probability**2 * torch.log(1 - probability)
    loss = torch.where(positive, positive_loss, negative_loss).sum()
    return loss / positive.sum().clamp(min=1)


def _train_one_judge(
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    rounding_chance: float,
    progress: bool,
    desc: str = "judge",
) -> ShapesJudge:
    """One judge trained from scratch on ``images``; ``seed`` sets its initial weights, the
    augmentations and the order of the images."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_images = len(images)
    judge = ShapesJudge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(train_images / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(total=steps, desc=desc, disable=not progress)
    judge.train()
    for _ in range(epochs):
        order = torch.randperm(train_images, generator=generator)
        for start in range(0, train_images, batch_size):
            index = order[start : start + batch_size]
            cells, _ = judge(augment(images[index], generator, rounding_chance))
            target = targets[index]
            loss_heat = _focal_heat_loss(cells[:, 0], target[:, 0])
            near = target[:, 1] > 0  # [b, 16, 16]
            weight = target[:, 1][near]
            at_objects = cells.permute(0, 2, 3, 1)[near]  # [n, 19]
            wanted = target.permute(0, 2, 3, 1)[near]  # [n, 6]
            color_logits = at_objects[:, 1 : 1 + NUM_COLORS]
            shape_logits = at_objects[:, 1 + NUM_COLORS : 1 + NUM_COLORS + NUM_SHAPES]
            loss_color = (
                nn.functional.cross_entropy(color_logits, wanted[:, 2].long(), reduction="none") * weight
            ).mean()
            loss_shape = (
                nn.functional.cross_entropy(shape_logits, wanted[:, 3].long(), reduction="none") * weight
            ).mean()
            offsets = torch.sigmoid(at_objects[:, -2:]) * 2 - 0.5
            loss_offset = nn.functional.l1_loss(offsets, wanted[:, 4:])
            loss = loss_heat + loss_color + loss_shape + loss_offset
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(
                heat=f"{loss_heat.item():.4f}",
                color=f"{loss_color.item():.4f}",
                shape=f"{loss_shape.item():.4f}",
                offset=f"{loss_offset.item():.4f}",
            )
    bar.close()
    return judge.eval()


def member_file(index: int) -> str:
    """The weights file of a judge folder's member ``index``: the first is ``judge.safetensors``."""
    return "judge.safetensors" if index == 0 else f"judge-{index}.safetensors"


def train_judge(
    output_dir: str | Path = JUDGE_DIR,
    *,
    train_images: int = 16000,
    epochs: int = 2,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    members: int = 1,
    generated: list[str | Path] = (),
    loose_fraction: float = 0.0,
    large_fraction: float = 0.0,
    clipped_fraction: float = 0.0,
    rounded_hexagon_fraction: float = 0.0,
    rounding_chance: float = 0.4,
    heldout_images: int = 2000,
    progress: bool = True,
) -> JudgeTrainingReport:
    """Train the judge from scratch on augmented renders and save it (safetensors + config).

    ``members``: train that many judges on the same images, from seeds ``seed``,
    ``seed + 1``, ...; they are read as one (:class:`JudgeEnsemble`). The training seed alone
    moves a judge's reading of generated images by several points (docs/shapes-eval.md);
    averaging judges takes most of that out. Member 0 is the judge ``members=1`` trains.
    ``generated``: labelled folders of generated images (e.g. pseudo-labelled where the judge
    and the classical reader agree) mixed in; never the labelled set the judge is checked on.
    ``loose_fraction``: the fraction of objects drawn loosely (:func:`training_styles`);
    ``large_fraction``: of one-object scenes given a radius of 0.25-0.34 (:func:`training_scene`);
    ``clipped_fraction``: of those, moved so that the outline runs off the left or right edge;
    ``rounded_hexagon_fraction``: of hexagons drawn with rounded corners (:func:`training_styles`);
    ``rounding_chance``: of images whose corners ``augment`` rounds. The defaults train the
    shipped one-stage judge (the first stage of the default, two-stage one); docs/shapes-eval.md
    says what the others did on generated images.
    ``heldout_images``: renders of another seed it is checked on afterwards (the report).
    """
    from safetensors.torch import save_file

    fractions = {
        "--loose-fraction": loose_fraction,
        "--large-fraction": large_fraction,
        "--clipped-fraction": clipped_fraction,
        "--rounded-hexagons": rounded_hexagon_fraction,
        "--rounding-chance": rounding_chance,
    }
    for flag, value in fractions.items():
        if not 0 <= value <= 1:
            raise InputError(f"{flag} {value} is not a fraction", hint="give a number from 0 to 1")
    if members < 1:
        raise InputError(f"--members {members}: a judge needs at least one member", hint="give 1 or more")
    shipped = {folder.resolve() for folder in SHIPPED_LABELLED_DIRS}
    if any(Path(folder).resolve() in shipped for folder in generated):
        raise InputError("the judge is checked on the shipped labelled sets: it must not train on them")
    renders = train_images
    scenes = [
        training_scene(i, large_fraction=large_fraction, clipped_fraction=clipped_fraction)
        for i in range(train_images)
    ]
    styles = [
        training_styles(scene, i, loose_fraction, rounded_hexagon_fraction) for i, scene in enumerate(scenes)
    ]
    images, targets = render_batch(scenes, styles)
    checked_on = labelled_set_fingerprints() if generated else set()
    generated_dropped = 0
    loaded: dict[Path, tuple[torch.Tensor, torch.Tensor, int]] = {}  # a folder given N times weighs N times
    for folder in generated:
        key = Path(folder).resolve()
        if key not in loaded:
            loaded[key] = labelled_scenes(folder, exclude=checked_on)
        extra_images, extra_targets, dropped = loaded[key]
        images, targets = torch.cat([images, extra_images]), torch.cat([targets, extra_targets])
        generated_dropped += dropped
    if generated_dropped:
        logger.warning(
            "left out %d generated training image(s) identical to images of the shipped labelled sets",
            generated_dropped,
        )
    train_images = len(images)
    steps = epochs * math.ceil(train_images / batch_size)
    trained = [
        _train_one_judge(
            images,
            targets,
            seed=seed + k,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            rounding_chance=rounding_chance,
            progress=progress,
            desc="judge" if members == 1 else f"judge {k + 1}/{members}",
        )
        for k in range(members)
    ]

    report = evaluate_judge(trained[0] if members == 1 else JudgeEnsemble(trained), count=heldout_images)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = [member_file(k) for k in range(members)]
    # Every file is written beside its final name and renamed into place (an atomic rename in one
    # folder), the config last, so an interrupted run never leaves a half-written judge.
    for judge, name in zip(trained, files, strict=True):
        staged = output_dir / f".{name}.tmp"
        save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, staged)
        os.replace(staged, output_dir / name)
    config = {
        "architecture": "centre heatmap, 16x16",
        "pairs": PAIRS,
        "image_size": 64,
        "train_seed": JUDGE_TRAIN_SEED,
        "train_images": train_images,  # renders plus generated images
        "epochs": epochs,
        "seed": seed,
        "members": files,  # trained from seeds seed, seed + 1, ...; read as one
        "detection_threshold": DETECTION_THRESHOLD,
        "generated": [str(folder) for folder in generated],
        "generated_dropped": generated_dropped,  # identical to an image the judge is checked on
        "loose_fraction": loose_fraction,
        "large_fraction": large_fraction,
        "clipped_fraction": clipped_fraction,
        "rounded_hexagon_fraction": rounded_hexagon_fraction,
        "rounding_chance": rounding_chance,
        "command": f"distilsd shapes train-judge --train-images {renders} --epochs {epochs} --seed {seed}"
        + (f" --members {members}" if members > 1 else "")
        + "".join(f" --generated {folder}" for folder in generated)
        + (f" --loose-fraction {loose_fraction}" if loose_fraction else "")
        + (f" --large-fraction {large_fraction}" if large_fraction else "")
        + (f" --clipped-fraction {clipped_fraction}" if clipped_fraction else "")
        + (f" --rounded-hexagons {rounded_hexagon_fraction}" if rounded_hexagon_fraction else "")
        + (f" --rounding-chance {rounding_chance}" if rounding_chance != 0.4 else ""),
        "report": report.__dict__ | {"steps": steps * members, "train_images": train_images},
    }
    staged = output_dir / ".judge_config.json.tmp"
    staged.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(staged, output_dir / "judge_config.json")
    for stale in output_dir.glob("judge-*.safetensors"):  # members of an earlier, larger ensemble
        if stale.name not in files:
            stale.unlink()
    return JudgeTrainingReport(
        steps=steps * members,
        train_images=train_images,
        heldout_scene_accuracy=report.heldout_scene_accuracy,
        heldout_caption_alignment=report.heldout_caption_alignment,
        heldout_images=report.heldout_images,
    )


def load_weights(module: nn.Module, weights: Path, what: str, command: str) -> nn.Module:
    """``module`` with the safetensors ``weights`` loaded, in eval mode; one line if they are missing or
    of another architecture, naming the ``distilsd shapes`` command that trains them."""
    from safetensors.torch import load_file

    if not weights.exists():
        raise InputError(
            f"the Shapes {what} weights {weights} are missing",
            hint=f"train them with: distilsd shapes {command}",
        )
    try:
        module.load_state_dict(load_file(weights))
    except RuntimeError:
        raise InputError(
            f"{weights} holds weights of another {what} architecture",
            hint=f"train this one with: distilsd shapes {command} -o FOLDER",
        ) from None
    return module.eval()


def judge_folder(path: str | Path | None) -> Path:
    """The folder of a judge: a name of :data:`BUILTIN_JUDGES`, a folder, or None for :data:`DEFAULT_JUDGE`."""
    if path is None:
        path = DEFAULT_JUDGE
    return BUILTIN_JUDGES.get(str(path), Path(path))


def load_judge(path: str | Path | None = None) -> nn.Module:
    """The judge in ``path`` (a ``shapes train-judge -o`` folder, or a name of :data:`BUILTIN_JUDGES`);
    None: :data:`DEFAULT_JUDGE`, the two-stage judge.

    A folder trained with ``--members N`` (its ``judge_config.json`` lists N weights files)
    gives a :class:`JudgeEnsemble`, which reads images like one judge; a folder with a second
    stage (``shapes train-second-stage``) a :class:`TwoStageJudge`.
    """

    path = judge_folder(path)
    config_file = path / "judge_config.json"
    files = ["judge.safetensors"]
    second_stage = None
    if config_file.exists():
        try:
            config = json.loads(config_file.read_text())
            files = config.get("members", files)
            second_stage = config.get("second_stage")
        except (ValueError, AttributeError):
            files = None
        if not isinstance(files, list) or not files or not all(isinstance(name, str) for name in files):
            raise InputError(
                f"{config_file} is not a judge config (a JSON object whose 'members' lists weights files)",
                hint="train the judge again with: distilsd shapes train-judge -o FOLDER",
            )
    members = [load_weights(ShapesJudge(), path / name, "judge", "train-judge") for name in files]
    first_stage = members[0] if len(members) == 1 else JudgeEnsemble(members).eval()
    if second_stage is None:
        return first_stage
    return load_second_stage(path, first_stage, second_stage)


def judge_name(path: str | Path | None) -> str:
    """How results name the judge that read them: its built-in name ('two-stage', 'one-stage') or its folder."""
    folder = judge_folder(path).resolve()
    for name, builtin in BUILTIN_JUDGES.items():
        if folder == builtin.resolve():
            return name
    return str(path)


# ---- judging --------------------------------------------------------------------------------


@dataclass
class Reading:
    """What the judge reads in one image."""

    objects: list[Detection]  # most certain first
    features: np.ndarray = field(repr=False)  # [192], for Shapes-FID

    def best(self, pair: tuple[str, str]) -> Detection | None:
        """The most certain object of this colour and shape, or None."""
        return next((d for d in self.objects if d.pair == pair), None)

    def to_json(self) -> list[dict]:
        return [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(d).items()}
            for d in self.objects
        ]


@torch.no_grad()
def read_images(judge: nn.Module, images, batch_size: int = 256) -> list[Reading]:
    """Judge PIL images (or a [B, 3, 64, 64] tensor in [0, 1]) with any judge :func:`load_judge` gives."""
    tensor = images if isinstance(images, torch.Tensor) else images_to_tensor(images)
    readings = []
    for start in range(0, len(tensor), batch_size):
        batch = tensor[start : start + batch_size]
        cells, features = judge(batch)
        # A two-stage judge re-reads the heatmap's proposals from the pixels (TwoStageJudge).
        found = judge.detect(batch, cells) if hasattr(judge, "detect") else decode(cells)
        for objects, f in zip(found, features.numpy(), strict=True):
            readings.append(Reading(objects, f))
    return readings


def _position_holds(position: str, x: float, y: float) -> bool:
    if position == "center":
        return 0.35 <= x <= 0.65 and 0.35 <= y <= 0.65
    # Accept anything on the stated side of the image's middle band.
    assert position in POSITIONS
    return {"left": x < 0.45, "right": x > 0.55, "top": y < 0.45, "bottom": y > 0.55}[position]


def is_aligned(reading: Reading, target: PromptTarget, mode: str = "exact") -> bool:
    """Does the image hold the objects of ``target``, where the prompt says they are?

    ``exact``: the objects the judge reads are exactly the prompt's (an extra object, or a
    second copy of one, is a miss); ``contains``: the prompt's objects are among them.
    """
    if mode not in ALIGNMENT_MODES:
        raise ValueError(f"alignment mode {mode!r} is not one of {ALIGNMENT_MODES}")
    if mode == "exact" and sorted(d.pair for d in reading.objects) != sorted(target.objects):
        return False
    found = [reading.best(pair) for pair in target.objects]
    if any(d is None for d in found):
        return False
    if target.position is not None:
        return _position_holds(target.position, found[0].x, found[0].y)
    if target.relation is not None and target.relation != "and" and len(found) == 2:
        a, b = found
        return {"left of": a.x < b.x, "right of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[
            target.relation
        ]
    return True


def evaluate_judge(
    judge: ShapesJudge, count: int = 2000, seed: int = JUDGE_HELDOUT_SEED
) -> JudgeTrainingReport:
    """Accuracy on held-out renders: exactly the scene's objects found, centres within 0.1."""
    from distilsd.shapes.captions import parse_caption

    scenes = [scene_for_index(seed, i, shapes=SHAPES) for i in range(count)]
    readings = read_images(judge, [render(scene) for scene in scenes])
    exact = aligned = 0
    for scene, reading in zip(scenes, readings, strict=True):
        same_set = sorted(d.pair for d in reading.objects) == sorted(
            (o.color, o.shape) for o in scene.objects
        )
        close = same_set and all(
            math.hypot(reading.best((o.color, o.shape)).x - o.x, reading.best((o.color, o.shape)).y - o.y)
            < 0.1
            for o in scene.objects
        )
        exact += close
        aligned += is_aligned(reading, parse_caption(scene.caption))
    return JudgeTrainingReport(
        steps=0,
        train_images=0,
        heldout_scene_accuracy=float(exact / count),
        heldout_caption_alignment=float(aligned / count),
        heldout_images=count,
    )


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between two feature sets (the FID formula)."""
    from scipy import linalg

    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    sigma_a, sigma_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    covmean, _ = linalg.sqrtm(sigma_a @ sigma_b, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))
