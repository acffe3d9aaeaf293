#!/usr/bin/env python
"""How many hexagons survive the Shapes VAE: the ceiling of any U-Net trained on its latents.

    python scripts/hexagon_vae_ceiling.py [--prompts 100] [--prompt-seed 404] [--refine-steps 150]

The hexagon scenes of `shapes eval-hexagon` (the same prompts: seed 404, the reported set) are
rendered exactly, then read three ways by the judge and by the classical reader, with
eval-hexagon's verdict (a hexagon of the prompt's colour): the render itself; the render
through the VAE (the encoder's latent mean, decoded), which is what a U-Net trained on the
encoded instance images learns to draw; and the decoder-inverted latent
(`distilsd.distill.cache.refine_latent_means`, what `dreambooth --refine-latents N` trains on),
which shows whether the decoder can draw a hexagon at all. Wilson 95% intervals.
docs/personalise.md uses it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from distilsd.distill.cache import encode_images, refine_latent_means
from distilsd.models import BUILTIN_MODELS, builtin_folder
from distilsd.shapes.classic import ClassicReading, read_classic
from distilsd.shapes.evaluate import _levels
from distilsd.shapes.judge import load_judge, read_images
from distilsd.shapes.personalise import subject_scenes, wilson_interval
from distilsd.shapes.world import render


def to_images(decoded: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(level.astype(np.uint8)) for level in _levels(decoded)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes", help="Pipeline whose VAE is read (default: shapes).")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--prompt-seed", type=int, default=404)
    parser.add_argument("--shape", default="hexagon")
    parser.add_argument("--refine-steps", type=int, default=150, help="0: skip the decoder inversion.")
    parser.add_argument("--judge", default=None, help="Judge name or folder (default: the default judge).")
    args = parser.parse_args()

    from diffusers import AutoencoderKL

    torch.set_grad_enabled(False)
    scenes = subject_scenes(args.prompts, args.shape, seed=args.prompt_seed)
    renders = [render(scene).convert("RGB") for scene in scenes]
    folder = builtin_folder(args.model) if args.model in BUILTIN_MODELS else args.model
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae").eval().requires_grad_(False)
    pixels = torch.from_numpy(np.stack([np.asarray(r, dtype=np.float32) for r in renders]) / 127.5 - 1.0)
    pixels = pixels.permute(0, 3, 1, 2)
    mean, _ = encode_images(vae, pixels)
    views = {
        "render": renders,
        "VAE round trip (encoder mean)": to_images(vae.decode(mean).sample),
    }
    if args.refine_steps:
        refined = refine_latent_means(vae, pixels, mean, args.refine_steps)
        views[f"decoder-inverted latent ({args.refine_steps} steps)"] = to_images(vae.decode(refined).sample)
    judge = load_judge(args.judge)
    small = np.array([scene.objects[0].size == "small" for scene in scenes])
    print(
        f"{args.prompts} {args.shape} prompts, --prompt-seed {args.prompt_seed} ({small.sum()} small objects)"
    )
    print("| image | judge | classical reader | judge, small objects |")
    print("|---|---|---|---|")
    for name, images in views.items():
        readings = (read_images(judge, images), [ClassicReading(read_classic(im)) for im in images])
        found = [
            np.array(
                [
                    r.best((s.objects[0].color, args.shape)) is not None
                    for r, s in zip(reads, scenes, strict=True)
                ]
            )
            for reads in readings
        ]
        cells = []
        for verdicts in found:
            low, high = wilson_interval(int(verdicts.sum()), len(verdicts))
            cells.append(f"{verdicts.mean():.2f} [{low:.2f}, {high:.2f}]")
        cells.append(f"{found[0][small].mean():.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
