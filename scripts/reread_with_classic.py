#!/usr/bin/env python
"""Re-read a `distilsd shapes eval` folder with the classical reader, as an independent check.

    python scripts/reread_with_classic.py EVAL_DIR MODEL_FOLDER [MODEL_FOLDER ...]

Reads each image that `shapes eval` recorded in ``EVAL_DIR/MODEL_FOLDER/judged.jsonl`` with
:func:`distilsd.shapes.classic.read_classic` (colour segmentation and shape templates, no
learnt weights), scores exact alignment as the judge does (:func:`is_aligned`), and prints
per group the reader's alignment with its bootstrap interval, the judge's, how often the two
agree, and for every pair of models the paired difference (first minus second) with its
interval, by the reader and by the judge (the one that read the folder: ``judged.jsonl``).
docs/shapes-eval.md uses it for the 400-prompt comparison.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from PIL import Image

from distilsd.evaluate.stats import bootstrap_mean, paired_difference
from distilsd.shapes.captions import parse_caption
from distilsd.shapes.classic import ClassicReading, read_classic
from distilsd.shapes.judge import is_aligned


def verdicts(folder: Path) -> dict[str, tuple[int, bool, bool]]:
    """file -> (objects asked, aligned by the classical reader, aligned by the judge)."""
    out = {}
    for line in (folder / "judged.jsonl").read_text().splitlines():
        row = json.loads(line)
        with Image.open(folder / row["file"]) as image:
            reading = ClassicReading(read_classic(image.convert("RGB")))
        aligned = is_aligned(reading, parse_caption(row["prompt"]))
        out[row["file"]] = (row["objects_asked"], aligned, row["aligned"]["exact"])
    return out


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    root, models = Path(sys.argv[1]), sys.argv[2:]
    read = {model: verdicts(root / model) for model in models}
    for model, count in itertools.product(models, (1, 2)):
        files = sorted(f for f, v in read[model].items() if v[0] == count)
        classic = [read[model][f][1] for f in files]
        judge = [read[model][f][2] for f in files]
        agree = sum(a == b for a, b in zip(classic, judge, strict=True)) / len(files)
        print(
            f"{model} {count} obj: reader {bootstrap_mean(classic):.3f}, judge {sum(judge) / len(judge):.3f}, agreement {agree:.3f}"
        )
    for later, earlier in itertools.combinations(models, 2):
        for count in (1, 2):
            # The images both folders hold: a run of fewer prompts pairs with the first of a longer one.
            files = sorted(f for f, v in read[earlier].items() if v[0] == count and f in read[later])
            for name, column in (("reader", 1), ("judge", 2)):
                diff = paired_difference(
                    [read[later][f][column] for f in files], [read[earlier][f][column] for f in files]
                )
                print(f"{name} {later} - {earlier}, {count} obj: {diff:.3f}")


if __name__ == "__main__":
    main()
