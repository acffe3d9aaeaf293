#!/usr/bin/env python
"""Compare two DreamBooth recipes over several training seeds, on `shapes eval-hexagon` folders.

    python scripts/compare_hexagon_recipes.py --a tune-pb-s0 tune-pb-s1 tune-pb-s2 \
        --b tune-piv-s0 tune-piv-s1 tune-piv-s2 --base tune-pb-s0/base --prompt-seed 505

Each folder is one run's `eval-hexagon` output (the same --prompt-seed, --prompts and
--prior-prompts for all). Every image is read by the judge and by the classical reader
(:func:`distilsd.shapes.classic.read_classic`, no learnt weights) with eval-hexagon's verdicts:
a hexagon of the prompt's colour on the subject prompts, exact alignment on the usual ones.
Per reader it prints each recipe's rates (the mean over its runs, and each run's), and A minus
B with two 95% intervals: resampling prompts (the runs share prompts and sampling seeds, so the
comparison is paired), and resampling the training runs of each recipe too (two-level), which
is the one that says whether another seed could turn the result around. With ``--base`` also
each recipe's usual-prompt change against the base model. docs/personalise.md uses it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from distilsd.shapes.captions import parse_caption
from distilsd.shapes.classic import ClassicReading, read_classic
from distilsd.shapes.evaluate import heldout_scenes
from distilsd.shapes.judge import is_aligned, load_judge, read_images
from distilsd.shapes.personalise import subject_scenes

READERS = ("judge", "classic")


def verdicts(folder: Path, subject, usual, shape: str, judge) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """reader -> (hexagon found per subject prompt, aligned per usual prompt), as 0/1 arrays."""
    images = [Image.open(folder / f"{shape}-{i:04d}.png") for i in range(len(subject))]
    images += [Image.open(folder / f"1obj-{i:04d}.png") for i in range(len(usual))]
    readings = {
        "judge": read_images(judge, images),
        "classic": [ClassicReading(read_classic(image)) for image in images],
    }
    out = {}
    for reader, reads in readings.items():
        found = [r.best((s.objects[0].color, shape)) is not None for r, s in zip(reads, subject)]
        aligned = [is_aligned(r, parse_caption(s.caption)) for r, s in zip(reads[len(subject) :], usual)]
        out[reader] = (np.array(found, float), np.array(aligned, float))
    return out


def interval(a: np.ndarray, b: np.ndarray, two_level: bool, draws: int = 10000, seed: int = 0):
    """Mean of A minus B ([runs, prompts] each) and its 95% bootstrap interval."""
    rng = np.random.default_rng(seed)
    prompts = a.shape[1]
    diffs = np.empty(draws)
    for k in range(draws):
        p = rng.integers(0, prompts, prompts)
        ra = rng.integers(0, len(a), len(a)) if two_level else np.arange(len(a))
        rb = rng.integers(0, len(b), len(b)) if two_level else np.arange(len(b))
        diffs[k] = a[ra][:, p].mean() - b[rb][:, p].mean()
    return a.mean() - b.mean(), np.quantile(diffs, 0.025), np.quantile(diffs, 0.975)


def text(value, low, high) -> str:
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", nargs="+", type=Path, required=True, help="Recipe A's eval-hexagon folders.")
    parser.add_argument("--b", nargs="+", type=Path, required=True, help="Recipe B's eval-hexagon folders.")
    parser.add_argument("--base", type=Path, help="The base model's folder (eval-hexagon --compare-base).")
    parser.add_argument("--prompt-seed", type=int, default=505)
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--prior-prompts", type=int, default=200)
    parser.add_argument("--shape", default="hexagon")
    args = parser.parse_args()

    subject = subject_scenes(args.prompts, args.shape, seed=args.prompt_seed)
    usual = heldout_scenes(1, args.prior_prompts)
    judge = load_judge()
    runs = {name: [verdicts(f, subject, usual, args.shape, judge) for f in folders] for name, folders in
            (("A", args.a), ("B", args.b))}  # fmt: skip
    base = verdicts(args.base, subject, usual, args.shape, judge) if args.base else None
    for reader in READERS:
        for what, column in ((args.shape, 0), ("usual", 1)):
            a = np.stack([run[reader][column] for run in runs["A"]])
            b = np.stack([run[reader][column] for run in runs["B"]])
            per_run = {
                name: ", ".join(f"{r[reader][column].mean():.3f}" for r in rs) for name, rs in runs.items()
            }
            print(f"{reader}, {what}: A {a.mean():.3f} ({per_run['A']})  B {b.mean():.3f} ({per_run['B']})")
            print(
                f"    A - B: prompts {text(*interval(a, b, False))}; runs and prompts {text(*interval(a, b, True))}"
            )
            if base is not None and column == 1:
                kept = base[reader][1][None]
                print(f"    against the base ({kept.mean():.3f}): A {text(*interval(a, kept, False))}, "
                      f"B {text(*interval(b, kept, False))}")  # fmt: skip


if __name__ == "__main__":
    main()
