#!/usr/bin/env python
"""Compare two judge recipes over several training seeds, on the shipped labelled sets.

    python scripts/compare_judges.py --a runs/judge/rhex0 runs/judge/rhex1 runs/judge/rhex2 runs/judge/rhex3 \
        --b one-stage runs/judge/s1 runs/judge/s2 runs/judge/s3

Each folder is one `distilsd shapes train-judge -o` run, or a built-in judge's name (``one-stage``,
``two-stage``);
the i-th of --a is paired with the i-th of --b (the same --seed). For each labelled set it reads
every clear image with every judge, scores it right when the judge's object set equals the label,
and prints A minus B: the mean over the pairs, each pair's, and a 95% interval from resampling the
seed pairs and the images together (two-level bootstrap), the one that says whether another seed
or another set of images could turn the result around. docs/shapes-eval.md uses it.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from PIL import Image

from distilsd.errors import InputError
from distilsd.shapes.judge import load_judge, read_images
from distilsd.shapes.labelled import HEXAGON_LABELLED_DIR, LABELLED_DIR, load_labels

SETS = {"first set": LABELLED_DIR, "hexagon set": HEXAGON_LABELLED_DIR}


def right_per_image(judge_dir: str, folder, expected: dict | None = None) -> np.ndarray:
    """1 where the judge reads exactly the labelled object set of a clear image, else 0.

    ``expected``: other labels for the same images (file -> sorted pairs), e.g. a blind relabelling;
    only its files are scored.
    """
    labels = [label for label in load_labels(folder) if label.clear]
    if expected is not None:
        labels = [label for label in labels if label.file in expected]
    wanted = [label.pairs if expected is None else expected[label.file] for label in labels]
    judge = load_judge(judge_dir)
    readings = read_images(judge, [Image.open(folder / label.file) for label in labels])
    return np.array(
        [pairs == sorted(d.pair for d in r.objects) for pairs, r in zip(wanted, readings, strict=True)],
        dtype=float,
    )


def blind_sets(path: str) -> dict[str, dict]:
    """The first set scored against a blind relabelling (scripts/relabel_blind.py): against the blind
    labels where they call an image clear, and against both where the two labellings agree."""
    import json
    from pathlib import Path

    blind = json.loads(Path(path).read_text())["labels"]
    shipped = {label.file: label.pairs for label in load_labels(LABELLED_DIR) if label.clear}
    again = {f: sorted(map(tuple, objects)) for f, objects in blind.items() if objects is not None}
    agreed = {f: pairs for f, pairs in again.items() if shipped.get(f) == pairs}
    return {"first set, blind labels": again, "first set, where both labellings agree": agreed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", nargs="+", required=True, help="judge folders of recipe A, one per seed")
    parser.add_argument(
        "--b", nargs="+", required=True, help="judge folders of recipe B, the same seeds in order"
    )
    parser.add_argument("--draws", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0, help="of the bootstrap")
    parser.add_argument(
        "--blind",
        help="a blind relabelling of the first set (scripts/relabel_blind.py collect): score against it too",
    )
    args = parser.parse_args()
    if len(args.a) != len(args.b):
        parser.error(f"--a has {len(args.a)} judges and --b {len(args.b)}: give one of each per seed")
    rng = np.random.default_rng(args.seed)
    sets = [(name, folder, None) for name, folder in SETS.items()]
    if args.blind:
        sets += [(name, LABELLED_DIR, expected) for name, expected in blind_sets(args.blind).items()]
    for name, folder, expected in sets:
        a = np.stack([right_per_image(judge, folder, expected) for judge in args.a])  # [pair, image]
        b = np.stack([right_per_image(judge, folder, expected) for judge in args.b])
        difference = a - b
        pairs, images = difference.shape
        draws = [
            difference[rng.integers(0, pairs, pairs)][:, rng.integers(0, images, images)].mean()
            for _ in range(args.draws)
        ]
        low, high = np.percentile(draws, [2.5, 97.5])
        per_pair = ", ".join(f"{d:+.3f}" for d in difference.mean(axis=1))
        print(
            f"{name} ({images} clear images): A {a.mean():.3f}, B {b.mean():.3f}, "
            f"A - B {difference.mean():+.3f} [{low:+.3f}, {high:+.3f}] (per pair: {per_pair})"
        )


if __name__ == "__main__":
    try:
        main()
    except InputError as exc:  # a judge folder that is missing or not a judge: one line, no traceback
        sys.exit(f"error: {exc}")
