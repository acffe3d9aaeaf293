"""The Shapes judge: a small CNN that says which (color, shape) objects an image holds, and where.

It is trained on rendered scenes with their ground-truth attributes (with blur, noise and
brightness augmentation, so generated images that are slightly soft are still read), and
scores generated images:

- **alignment**: the fraction of prompts whose every object (color + shape), and the
  position or relation the prompt states, the judge finds;
- **Shapes-FID**: the Fréchet distance between the judge's penultimate features of
  generated and of rendered images (the Inception-FID recipe on a network that knows this
  world).

Outputs per image: a presence logit for each of the 64 (color, shape) pairs, and the
predicted centre (x, y) of each pair.
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
FEATURE_DIM = 256
# Data seeds: the judge trains on one, is checked on another; prompt sets use others again.
JUDGE_TRAIN_SEED = 101
JUDGE_HELDOUT_SEED = 202


class ShapesJudge(nn.Module):
    """CoordConv CNN: 64x64 RGB in [0, 1] -> (presence logits [B, 64], centres [B, 64, 2], features [B, 256])."""

    def __init__(self, image_size: int = 64):
        super().__init__()
        self.image_size = image_size

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, stride=2, padding=1), nn.SiLU())

        # 5 input channels: RGB + x and y coordinate maps, so positions survive the flatten.
        self.body = nn.Sequential(block(5, 32), block(32, 64), block(64, 128), block(128, 128))  # 64 -> 4
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(128 * (image_size // 16) ** 2, FEATURE_DIM), nn.SiLU())
        self.presence = nn.Linear(FEATURE_DIM, len(PAIRS))
        self.centres = nn.Linear(FEATURE_DIM, len(PAIRS) * 2)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, _, height, width = images.shape
        ys = torch.linspace(0, 1, height, device=images.device).view(1, 1, height, 1).expand(batch, 1, height, width)
        xs = torch.linspace(0, 1, width, device=images.device).view(1, 1, 1, width).expand(batch, 1, height, width)
        features = self.features(self.body(torch.cat([images * 2 - 1, xs, ys], dim=1)))
        centres = torch.sigmoid(self.centres(features)).view(batch, len(PAIRS), 2)
        return self.presence(features), centres, features


# ---- data -----------------------------------------------------------------------------------


def scene_targets(scene: Scene) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    presence = torch.zeros(len(PAIRS))
    centres = torch.zeros(len(PAIRS), 2)
    for obj in scene.objects:
        index = PAIR_INDEX[(obj.color, obj.shape)]
        presence[index] = 1.0
        centres[index] = torch.tensor([obj.x, obj.y])
    return presence, centres, presence.clone()


def images_to_tensor(images) -> torch.Tensor:
    """PIL images (any size) -> float tensor [B, 3, 64, 64] in [0, 1]."""
    from PIL import Image

    arrays = [np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR) if im.size != (64, 64) else im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
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


def render_batch(seed: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scenes = [scene_for_index(seed, start + i, shapes=SHAPES) for i in range(count)]
    images = images_to_tensor([render(scene) for scene in scenes])
    targets = [scene_targets(scene) for scene in scenes]
    return images, torch.stack([t[0] for t in targets]), torch.stack([t[1] for t in targets])


# ---- training -------------------------------------------------------------------------------


@dataclass
class JudgeTrainingReport:
    steps: int
    train_images: int
    heldout_scene_accuracy: float  # exact set of objects found, and each within 0.1 of its centre
    heldout_caption_alignment: float  # the renders' own captions judged aligned
    heldout_images: int


def train_judge(output_dir: str | Path = JUDGE_DIR, *, train_images: int = 24000, epochs: int = 6, batch_size: int = 64, lr: float = 2e-3, seed: int = 0, progress: bool = True) -> JudgeTrainingReport:
    """Train the judge from scratch on renders and save it (safetensors + config)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, presence, centres = render_batch(JUDGE_TRAIN_SEED, 0, train_images)
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
            logits, predicted_centres, _ = judge(augment(images[index], generator))
            present = presence[index]
            loss_presence = nn.functional.binary_cross_entropy_with_logits(logits, present)
            centre_error = ((predicted_centres - centres[index]) ** 2).sum(-1)
            loss_centres = (centre_error * present).sum() / present.sum().clamp(min=1)
            loss = loss_presence + 10 * loss_centres
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(presence=f"{loss_presence.item():.4f}", centres=f"{loss_centres.item():.5f}")
    bar.close()
    judge.eval()

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, output_dir / "judge.safetensors")
    report = evaluate_judge(judge)
    config = {"pairs": PAIRS, "image_size": 64, "train_seed": JUDGE_TRAIN_SEED, "train_images": train_images, "epochs": epochs, "report": report.__dict__ | {"steps": steps, "train_images": train_images}}
    (output_dir / "judge_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return JudgeTrainingReport(steps=steps, train_images=train_images, heldout_scene_accuracy=report.heldout_scene_accuracy, heldout_caption_alignment=report.heldout_caption_alignment, heldout_images=report.heldout_images)


def load_judge(path: str | Path = JUDGE_DIR) -> ShapesJudge:
    from safetensors.torch import load_file

    weights = Path(path) / "judge.safetensors"
    if not weights.exists():
        raise InputError(f"the Shapes judge weights {weights} are missing", hint="train them with: distilsd shapes train-judge")
    judge = ShapesJudge()
    judge.load_state_dict(load_file(weights))
    return judge.eval()


# ---- judging --------------------------------------------------------------------------------


@dataclass
class Reading:
    """What the judge reads in one image."""

    probabilities: np.ndarray  # [64] presence probability per (color, shape)
    centres: np.ndarray  # [64, 2]
    features: np.ndarray  # [256]


@torch.no_grad()
def read_images(judge: ShapesJudge, images, batch_size: int = 256) -> list[Reading]:
    """Judge PIL images (or a [B, 3, 64, 64] tensor in [0, 1])."""
    tensor = images if isinstance(images, torch.Tensor) else images_to_tensor(images)
    readings = []
    for start in range(0, len(tensor), batch_size):
        logits, centres, features = judge(tensor[start : start + batch_size])
        for p, c, f in zip(torch.sigmoid(logits).numpy(), centres.numpy(), features.numpy()):
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


def evaluate_judge(judge: ShapesJudge, count: int = 2000, seed: int = JUDGE_HELDOUT_SEED) -> JudgeTrainingReport:
    """Accuracy on held-out renders: the exact object set found with centres within 0.1."""
    from distilsd.shapes.captions import parse_caption

    scenes = [scene_for_index(seed, i, shapes=SHAPES) for i in range(count)]
    readings = read_images(judge, [render(scene) for scene in scenes])
    exact = aligned = 0
    for scene, reading in zip(scenes, readings):
        found = {PAIRS[i] for i in np.flatnonzero(reading.probabilities >= 0.5)}
        wanted = {(o.color, o.shape) for o in scene.objects}
        close = all(np.hypot(*(reading.centres[PAIR_INDEX[(o.color, o.shape)]] - (o.x, o.y))) < 0.1 for o in scene.objects)
        exact += found == wanted and close
        aligned += is_aligned(reading, parse_caption(scene.caption))
    return JudgeTrainingReport(steps=0, train_images=0, heldout_scene_accuracy=exact / count, heldout_caption_alignment=aligned / count, heldout_images=count)


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


