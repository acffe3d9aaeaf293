#!/usr/bin/env python
"""Two tiny decoders and the full VAE on the same latents, paired: which decodes the Shapes world better?

    python scripts/compare_tiny_decoders.py --a runs/shapes/tiny-vae-aligned --b tiny [--prompts-per-group 800]

The held-out renders of ``distilsd shapes check-vae`` (prompt seed 303) are encoded by the
model's VAE (latent means) and decoded by the full VAE and by both tiny decoders (a folder, a
training checkpoint's ``vae/`` folder, or ``tiny``: the model's own). Each decode is read by the
judge and by the classical reader (no learnt weights); the script prints per reader and group
each decoder's exact alignment and the paired differences A - B, A - VAE and B - VAE (bootstrap
95% intervals over the images), and each decoder's mean distance in pixel levels to the renders
and to the full VAE's decode. ``check-vae --tiny-vae`` gives A - VAE alone; this pairs A with B
on the same images, as docs/fast.md's comparison of decoders does. It also reports how far the
VAE's round trip of a 32 px crop lies from the same crop of its whole-image round trip (four
windows per render): what a tiny VAE trained on crops taken before the VAE would be taught wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from distilsd.errors import DistilSDError
from distilsd.evaluate.stats import bootstrap_mean, paired_difference
from distilsd.models import builtin_folder
from distilsd.shapes.captions import parse_caption
from distilsd.shapes.classic import ClassicReading, read_classic
from distilsd.shapes.evaluate import _levels, heldout_scenes
from distilsd.shapes.judge import is_aligned, load_judge, read_images
from distilsd.shapes.world import render
from distilsd.tiny_vae import check_tiny_vae_fits, load_tiny_vae, read_tiny_vae_info, tiny_vae_folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="tiny VAE folder, or 'tiny' (the model's own)")
    parser.add_argument("--b", required=True, help="tiny VAE folder, or 'tiny'")
    parser.add_argument("-m", "--model", default="shapes", help="the pipeline whose VAE they imitate")
    parser.add_argument("--prompts-per-group", type=int, default=800)
    parser.add_argument(
        "--crop-size",
        type=int,
        default=32,
        help="also report how far the VAE's round trip of a crop this wide (4 windows per render) lies "
        "from the same crop of its whole-image round trip: what crop-first training targets are off by",
    )
    args = parser.parse_args(argv)

    folder = builtin_folder(args.model) if args.model == "shapes" else Path(args.model)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    decoders = {"vae": vae.decode}
    for name, spec in (("a", args.a), ("b", args.b)):
        try:
            tiny_folder = tiny_vae_folder(spec, folder)
            tiny = load_tiny_vae(tiny_folder).float().eval()
            check_tiny_vae_fits(tiny, vae, read_tiny_vae_info(tiny_folder), spec)
        except DistilSDError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        decoders[name] = lambda latents, tiny=tiny: tiny.decode(latents * vae.config.scaling_factor)

    n = args.prompts_per_group
    scenes = heldout_scenes(1, n) + heldout_scenes(2, n)
    targets = [parse_caption(scene.caption) for scene in scenes]
    renders = np.stack([np.asarray(render(scene).convert("RGB"), dtype=np.float32) for scene in scenes])
    levels = {name: [] for name in decoders}
    crop_gaps = []
    size, side = args.crop_size, renders.shape[1]
    windows = [(0, 0), (0, side - size), (side - size, 0), ((side - size) // 2, (side - size) // 2)]
    with torch.no_grad():
        for start in range(0, len(renders), 50):
            pixels = torch.from_numpy(renders[start : start + 50] / 127.5 - 1.0).permute(0, 3, 1, 2)
            latents = vae.encode(pixels).latent_dist.mean
            for name, decode in decoders.items():
                levels[name].append(_levels(decode(latents).sample))
            for top, left in windows if 0 < size < side else ():
                crop = pixels[:, :, top : top + size, left : left + size]
                crop_trip = _levels(vae.decode(vae.encode(crop).latent_dist.mean).sample)
                crop_gaps.append(
                    np.abs(crop_trip - levels["vae"][-1][:, top : top + size, left : left + size]).mean()
                )
    levels = {name: np.concatenate(parts) for name, parts in levels.items()}

    judge = load_judge()
    aligned = {}
    for name, images in levels.items():
        pil = [Image.fromarray(image.astype(np.uint8)) for image in images]
        readings = {
            "judge": read_images(judge, pil),
            "classic": [ClassicReading(read_classic(im)) for im in pil],
        }
        aligned[name] = {
            reader: np.array([is_aligned(r, t) for r, t in zip(reads, targets, strict=True)], dtype=float)
            for reader, reads in readings.items()
        }
    report: dict = {"a": args.a, "b": args.b, "prompts_per_group": n, "levels_from": {}}
    if crop_gaps:
        report[f"vae_round_trip_of_{size}px_crops_from_its_whole_image_round_trip"] = float(
            np.mean(crop_gaps)
        )
    for name, images in levels.items():
        report["levels_from"][name] = {
            "render": float(np.abs(images - renders).mean()),
            "vae": float(np.abs(images - levels["vae"]).mean()),
        }
    for reader in ("judge", "classic"):
        for group, part in (("single", slice(0, n)), ("two", slice(n, None))):
            row = {name: bootstrap_mean(aligned[name][reader][part]).to_json() for name in decoders}
            for first, second in (("a", "b"), ("a", "vae"), ("b", "vae")):
                difference = paired_difference(aligned[first][reader][part], aligned[second][reader][part])
                row[f"{first}_minus_{second}"] = difference.to_json()
            report[f"{reader}_{group}"] = row
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
