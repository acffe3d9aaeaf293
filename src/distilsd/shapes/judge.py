"""The Shapes judge: a small CNN detector that says which (color, shape) objects an image holds, and where.

It is trained on rendered scenes with their ground-truth attributes (with blur, noise and
brightness augmentation, so generated images that are slightly soft are still read), and
scores generated images:

- **alignment**: the fraction of prompts whose every object (color + shape), and the
  position or relation the prompt states, the judge finds;
- **Shapes-FID**: the Fréchet distance between the judge's penultimate features of
  generated and of rendered images (the Inception-FID recipe on a network that knows this
  world).

Read per image: a presence probability for each of the 64 (color, shape) pairs and the
predicted centre (x, y) of each pair (see :func:`decode`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distilsd.errors import InputError
from distilsd.shapes.captions import PromptTarget
from distilsd.shapes.world import COLORS, POSITIONS, SHAPES, Scene, render, scene_for_index

PAIRS = [(color, shape) for color in COLORS for shape in SHAPES]
PAIR_INDEX = {pair: i for i, pair in enumerate(PAIRS)}
JUDGE_DIR = Path(__file__).parent / "assets" / "judge"
# Data seeds: the judge trains on one, is checked on another; prompt sets use others again.
JUDGE_TRAIN_SEED = 101
JUDGE_HELDOUT_SEED = 202


GRID = 8  # detection cells per side: each object is assigned to the cell holding its centre
NUM_COLORS, NUM_SHAPES = len(COLORS), len(SHAPES)


class ShapesJudge(nn.Module):
    """A small single-shot detector over an 8x8 grid of cells (YOLO-style).

    Each cell predicts: is an object's centre here (1 logit), its color (8 logits), its
    shape (8 logits) and the centre's offset within the cell (2). Objects never share a
    cell (scenes keep them apart), and the convolutions are translation-equivariant, so
    this learns from few renders what a global classifier struggles with.
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

        self.body = nn.Sequential(block(3, 32), block(32, 64), block(64, 96))  # 64 -> 8
        # Context at cell level: a large shape spans up to 4 cells.
        self.context = nn.Sequential(
            nn.Conv2d(96, 96, 3, padding=1),
            nn.BatchNorm2d(96),
            nn.SiLU(),
            nn.Conv2d(96, 96, 3, padding=2, dilation=2),
            nn.BatchNorm2d(96),
            nn.SiLU(),
        )
        self.head = nn.Conv2d(96, 1 + NUM_COLORS + NUM_SHAPES + 2, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, 64, 64] in [0, 1] -> (cell predictions [B, 19, 8, 8], features [B, 192])."""
        grid = self.context(self.body(images * 2 - 1))
        features = torch.cat([grid.mean(dim=(2, 3)), grid.amax(dim=(2, 3))], dim=1)  # Shapes-FID features
        return self.head(grid), features


def decode(cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell predictions -> per (color, shape) pair: presence probability [B, 64] and centre [B, 64, 2].

    A pair's probability is the best cell's objectness x color x shape probability, and its
    centre that cell's predicted centre.
    """
    batch = cells.shape[0]
    objectness = torch.sigmoid(cells[:, 0])  # [B, 8, 8]
    colors = torch.softmax(cells[:, 1 : 1 + NUM_COLORS], dim=1)  # [B, 8c, 8, 8]
    shapes = torch.softmax(cells[:, 1 + NUM_COLORS : 1 + NUM_COLORS + NUM_SHAPES], dim=1)
    offsets = torch.sigmoid(cells[:, -2:])  # [B, 2, 8, 8]: x, y within the cell
    pair_scores = objectness[:, None, None] * colors[:, :, None] * shapes[:, None, :]  # [B, 8c, 8s, 8, 8]
    pair_scores = pair_scores.reshape(batch, NUM_COLORS * NUM_SHAPES, GRID * GRID)
    probabilities, best_cell = pair_scores.max(dim=-1)  # [B, 64]
    rows, cols = best_cell // GRID, best_cell % GRID
    flat_offsets = offsets.reshape(batch, 2, GRID * GRID)
    offset_x = torch.gather(flat_offsets[:, 0], 1, best_cell)
    offset_y = torch.gather(flat_offsets[:, 1], 1, best_cell)
    centres = torch.stack([(cols + offset_x) / GRID, (rows + offset_y) / GRID], dim=-1)
    return probabilities, centres


# ---- data -----------------------------------------------------------------------------------


def scene_targets(scene: Scene) -> torch.Tensor:
    """Per-cell targets [5, 8, 8]: objectness, color index, shape index, x and y offset in the cell."""
    target = torch.zeros(5, GRID, GRID)
    color_names, shape_names = list(COLORS), list(SHAPES)
    for obj in scene.objects:
        col, row = min(int(obj.x * GRID), GRID - 1), min(int(obj.y * GRID), GRID - 1)
        target[:, row, col] = torch.tensor(
            [
                1.0,
                color_names.index(obj.color),
                shape_names.index(obj.shape),
                obj.x * GRID - col,
                obj.y * GRID - row,
            ]
        )
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


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, noise and brightness jitter: generated images are softer and noisier than renders."""
    batch = images.shape[0]
    out = images
    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel2d = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
    blurred = nn.functional.conv2d(nn.functional.pad(out, (1, 1, 1, 1), mode="replicate"), kernel2d, groups=3)
    blur_mask = (torch.rand(batch, 1, 1, 1, generator=generator) < 0.5).float()
    out = blur_mask * blurred + (1 - blur_mask) * out
    noise_scale = torch.rand(batch, 1, 1, 1, generator=generator) * 0.08
    out = out + noise_scale * torch.randn(out.shape, generator=generator)
    out = out * (0.85 + 0.3 * torch.rand(batch, 1, 1, 1, generator=generator))
    return out.clamp(0, 1)


def render_batch(seed: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    scenes = [scene_for_index(seed, start + i, shapes=SHAPES) for i in range(count)]
    images = images_to_tensor([render(scene) for scene in scenes])
    return images, torch.stack([scene_targets(scene) for scene in scenes])


# ---- training -------------------------------------------------------------------------------


@dataclass
class JudgeTrainingReport:
    steps: int
    train_images: int
    heldout_scene_accuracy: float  # exact set of objects found, and each within 0.1 of its centre
    heldout_caption_alignment: float  # the renders' own captions judged aligned
    heldout_images: int


def train_judge(
    output_dir: str | Path = JUDGE_DIR,
    *,
    train_images: int = 16000,
    epochs: int = 2,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> JudgeTrainingReport:
    """Train the judge from scratch on renders and save it (safetensors + config)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, targets = render_batch(JUDGE_TRAIN_SEED, 0, train_images)
    judge = ShapesJudge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(train_images / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(total=steps, desc="judge", disable=not progress)
    judge.train()
    for _ in range(epochs):
        order = torch.randperm(train_images, generator=generator)
        for start in range(0, train_images, batch_size):
            index = order[start : start + batch_size]
            cells, _ = judge(augment(images[index], generator))
            target = targets[index]
            present = target[:, 0] > 0.5  # [b, 8, 8]
            loss_objectness = nn.functional.binary_cross_entropy_with_logits(
                cells[:, 0], target[:, 0], pos_weight=torch.tensor(8.0)
            )
            at_objects = cells.permute(0, 2, 3, 1)[present]  # [n, 19]
            wanted = target.permute(0, 2, 3, 1)[present]  # [n, 5]
            loss_color = nn.functional.cross_entropy(at_objects[:, 1 : 1 + NUM_COLORS], wanted[:, 1].long())
            loss_shape = nn.functional.cross_entropy(
                at_objects[:, 1 + NUM_COLORS : 1 + NUM_COLORS + NUM_SHAPES], wanted[:, 2].long()
            )
            loss_offset = nn.functional.mse_loss(torch.sigmoid(at_objects[:, -2:]), wanted[:, 3:])
            loss = loss_objectness + loss_color + loss_shape + 5 * loss_offset
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(
                obj=f"{loss_objectness.item():.4f}",
                color=f"{loss_color.item():.4f}",
                shape=f"{loss_shape.item():.4f}",
                offset=f"{loss_offset.item():.4f}",
            )
    bar.close()
    judge.eval()

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, output_dir / "judge.safetensors")
    report = evaluate_judge(judge)
    config = {
        "pairs": PAIRS,
        "image_size": 64,
        "train_seed": JUDGE_TRAIN_SEED,
        "train_images": train_images,
        "epochs": epochs,
        "report": report.__dict__ | {"steps": steps, "train_images": train_images},
    }
    (output_dir / "judge_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return JudgeTrainingReport(
        steps=steps,
        train_images=train_images,
        heldout_scene_accuracy=report.heldout_scene_accuracy,
        heldout_caption_alignment=report.heldout_caption_alignment,
        heldout_images=report.heldout_images,
    )


def load_judge(path: str | Path = JUDGE_DIR) -> ShapesJudge:
    from safetensors.torch import load_file

    weights = Path(path) / "judge.safetensors"
    if not weights.exists():
        raise InputError(
            f"the Shapes judge weights {weights} are missing",
            hint="train them with: distilsd shapes train-judge",
        )
    judge = ShapesJudge()
    judge.load_state_dict(load_file(weights))
    return judge.eval()


# ---- judging --------------------------------------------------------------------------------


@dataclass
class Reading:
    """What the judge reads in one image."""

    probabilities: np.ndarray  # [64] presence probability per (color, shape)
    centres: np.ndarray  # [64, 2]
    features: np.ndarray  # [192]


@torch.no_grad()
def read_images(judge: ShapesJudge, images, batch_size: int = 256) -> list[Reading]:
    """Judge PIL images (or a [B, 3, 64, 64] tensor in [0, 1])."""
    tensor = images if isinstance(images, torch.Tensor) else images_to_tensor(images)
    readings = []
    for start in range(0, len(tensor), batch_size):
        cells, features = judge(tensor[start : start + batch_size])
        probabilities, centres = decode(cells)
        for p, c, f in zip(probabilities.numpy(), centres.numpy(), features.numpy()):
            readings.append(Reading(p, c, f))
    return readings


def _position_holds(position: str, x: float, y: float) -> bool:
    if position == "center":
        return 0.35 <= x <= 0.65 and 0.35 <= y <= 0.65
    # Accept anything on the stated side of the image's middle band.
    (x0, x1), (y0, y1) = POSITIONS[position]
    return {"left": x < 0.45, "right": x > 0.55, "top": y < 0.45, "bottom": y > 0.55}[position]


def is_aligned(reading: Reading, target: PromptTarget, threshold: float = 0.5) -> bool:
    """Does the image hold every object of ``target``, where the prompt says it is?"""
    indices = [PAIR_INDEX[pair] for pair in target.objects]
    if any(reading.probabilities[i] < threshold for i in indices):
        return False
    if target.position is not None:
        x, y = reading.centres[indices[0]]
        return _position_holds(target.position, float(x), float(y))
    if target.relation is not None and target.relation != "and" and len(indices) == 2:
        (xa, ya), (xb, yb) = reading.centres[indices[0]], reading.centres[indices[1]]
        return {"left of": xa < xb, "right of": xa > xb, "above": ya < yb, "below": ya > yb}[target.relation]
    return True


def evaluate_judge(
    judge: ShapesJudge, count: int = 2000, seed: int = JUDGE_HELDOUT_SEED
) -> JudgeTrainingReport:
    """Accuracy on held-out renders: the exact object set found with centres within 0.1."""
    from distilsd.shapes.captions import parse_caption

    scenes = [scene_for_index(seed, i, shapes=SHAPES) for i in range(count)]
    readings = read_images(judge, [render(scene) for scene in scenes])
    exact = aligned = 0
    for scene, reading in zip(scenes, readings):
        found = {PAIRS[i] for i in np.flatnonzero(reading.probabilities >= 0.5)}
        wanted = {(o.color, o.shape) for o in scene.objects}
        close = all(
            np.hypot(*(reading.centres[PAIR_INDEX[(o.color, o.shape)]] - (o.x, o.y))) < 0.1
            for o in scene.objects
        )
        exact += found == wanted and close
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
