"""The Shapes model's text encoder, pretrained with CLIP's contrastive objective on Shapes data.

SD's U-Net learns from a text encoder that CLIP already trained against images; it does not
learn to read words from scratch. The Shapes teacher did at first use a random, frozen CLIP
text encoder, and after 3,000 steps its U-Net still ignored most of the caption: at the noise
levels where a sample's colours and shapes are decided, it predicted the same blob whatever
the words (docs/results.md, "Shapes model development"). In a random encoder 83% of a token state's energy is
the same for every caption, and cross-attention starts out averaging over all 24 tokens, so
the caption is a few percent of what the U-Net reads.

``pretrain_text_encoder`` trains the CLIP text transformer against a small image tower on the
training images (symmetric InfoNCE with a learned temperature, as CLIP). The text side is
pooled as the *mean over all token states* rather than CLIP's end-of-text token: the mean is
what cross-attention reads before it learns where to look, so every token, padding included,
learns to carry the caption. The image tower is thrown away, as SD does with CLIP's.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distilsd.errors import InputError, OutputError

HELDOUT = 1024  # the data's last samples, kept out of training to measure retrieval (default)


class ImageTower(nn.Module):
    """64 px image -> embedding: four stride-2 convolutions, then a linear layer over the 4x4 grid.

    The flattened grid (no pooling) keeps where things are, so "left of" can be matched.
    """

    def __init__(self, embed_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = [3, 32, 64, 128, 128]
        for cin, cout in zip(channels[:-1], channels[1:], strict=True):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(128 * 4 * 4, embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images).flatten(1))


@dataclass
class TextPretrainingReport:
    output: str
    steps: int
    batch_size: int
    train_pairs: int
    heldout_pairs: int
    first_loss: float  # symmetric InfoNCE on the first and the last training batch
    final_loss: float
    # Held-out caption -> image retrieval among the held-out pairs (chance: 1 / count). Many
    # captions fit several images (positions are drawn at random), so 1.0 is out of reach.
    heldout_top1_before: float
    heldout_top1: float
    heldout_top10: float
    seconds: float


def _load_pairs(
    data: str | Path, tokenizer, heldout: int, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """All images as uint8 [N, 3, 64, 64] and their captions' token ids [N, T]."""
    from tqdm.auto import tqdm

    from distilsd.distill.cache import tokenize  # the trainer's tokenization, so both see the same ids
    from distilsd.distill.config import DataConfig
    from distilsd.distill.data import open_source

    source = open_source(DataConfig(source=str(data)))
    if len(source) <= 2 * heldout:
        raise InputError(
            f"{data} has {len(source)} image-caption pairs; text pretraining holds out {heldout} and needs"
            " more than twice that",
            hint="make more with: distilsd shapes make-data --count 60000",
        )
    images = np.empty((len(source), 64, 64, 3), dtype=np.uint8)
    captions = []
    for index in tqdm(range(len(source)), desc="images", disable=not progress):
        image, caption = source.load(index)  # RGB
        images[index] = np.asarray(image if image.size == (64, 64) else image.resize((64, 64)))
        captions.append(caption)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), tokenize(tokenizer, captions)


def _text_embedding(text_encoder, projection: nn.Linear, token_ids: torch.Tensor) -> torch.Tensor:
    hidden = text_encoder(token_ids)[0]  # last_hidden_state: what the U-Net's cross-attention reads
    return nn.functional.normalize(projection(hidden.mean(dim=1)), dim=-1)


def _image_embedding(tower: ImageTower, images: torch.Tensor) -> torch.Tensor:
    return nn.functional.normalize(tower(images.float() / 127.5 - 1), dim=-1)


@torch.no_grad()
def _retrieval(text_encoder, projection, tower, images, token_ids) -> tuple[float, float]:
    """Top-1 and top-10 caption -> image retrieval accuracy."""
    similarity = _text_embedding(text_encoder, projection, token_ids) @ _image_embedding(tower, images).T
    ranks = (similarity > similarity.diagonal()[:, None]).sum(dim=1)
    return float((ranks < 1).float().mean()), float((ranks < 10).float().mean())


def pretrain_text_encoder(
    model: str | Path,
    data: str | Path,
    output_dir: str | Path,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    seed: int = 0,
    heldout: int = HELDOUT,
    overwrite: bool = False,
    progress: bool = True,
) -> TextPretrainingReport:
    """Copy the pipeline folder ``model`` to ``output_dir`` with its text encoder CLIP-pretrained.

    Writes atomically (a ``.partial`` folder renamed at the end). A run takes minutes, so an
    interrupted one is started again rather than resumed.
    """
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from tqdm.auto import tqdm
    from transformers import CLIPTextModel, CLIPTokenizer

    from distilsd.models import load_component

    model, output_dir = Path(model), Path(output_dir)
    if not (model / "model_index.json").is_file() or not (model / "text_encoder" / "config.json").is_file():
        raise InputError(
            f"{model} is not a pipeline folder with a text_encoder/", hint="give a `shapes init` folder"
        )
    if output_dir.exists() and not overwrite:
        raise OutputError(f"{output_dir} already exists", hint="choose another folder, or pass --overwrite")
    if steps < 1 or batch_size < 2 or heldout < 1:
        raise InputError("steps must be at least 1, heldout at least 1 and batch size at least 2")
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = load_component(CLIPTokenizer, model, "tokenizer", what="tokenizer")
    text_encoder = load_component(CLIPTextModel, model, "text_encoder", what="text encoder")
    images, token_ids = _load_pairs(data, tokenizer, heldout, progress)
    train_count = len(images) - heldout
    embed_dim = text_encoder.config.hidden_size
    projection = nn.Linear(embed_dim, embed_dim, bias=False)
    tower = ImageTower(embed_dim)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
    heldout_set = (images[train_count:], token_ids[train_count:])
    text_encoder.eval()  # no dropout in CLIP's text model; eval() keeps that explicit
    before, _ = _retrieval(text_encoder, projection, tower, *heldout_set)

    parameters = [*text_encoder.parameters(), *projection.parameters(), *tower.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=steps // 20, num_training_steps=steps
    )
    labels = torch.arange(batch_size)
    losses = []
    for _ in tqdm(range(steps), desc="text encoder", disable=not progress):
        index = torch.randint(0, train_count, (batch_size,), generator=generator)
        logits = logit_scale.exp().clamp(max=100) * (
            _text_embedding(text_encoder, projection, token_ids[index])
            @ _image_embedding(tower, images[index]).T
        )
        loss = (
            nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.T, labels)
        ) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    top1, top10 = _retrieval(text_encoder, projection, tower, *heldout_set)

    tmp = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    # The pipeline's own parts only: a training run's folder also holds checkpoints and logs.
    tmp.mkdir(parents=True)
    shutil.copy2(model / "model_index.json", tmp / "model_index.json")
    for part in json.loads((model / "model_index.json").read_text()):
        if not part.startswith("_") and part != "text_encoder" and (model / part).is_dir():
            shutil.copytree(model / part, tmp / part)
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    report = TextPretrainingReport(
        output=str(output_dir),
        steps=steps,
        batch_size=batch_size,
        train_pairs=train_count,
        heldout_pairs=heldout,
        first_loss=losses[0],
        final_loss=losses[-1],
        heldout_top1_before=before,
        heldout_top1=top1,
        heldout_top10=top10,
        seconds=round(time.perf_counter() - started, 1),
    )
    (tmp / "text_pretraining.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    if output_dir.exists():
        shutil.rmtree(output_dir)
    tmp.rename(output_dir)
    return report
