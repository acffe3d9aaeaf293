#!/usr/bin/env python
"""Label a labelled set again, blind, and measure how well its labels repeat and how judges read both.

    python scripts/relabel_blind.py sheets -o outputs/blind                 # shuffled sheets, no readings, no prompts
    # a person writes outputs/blind/blind.txt: one line per image, "17 red star; blue circle", "?" (unclear) or "none"
    python scripts/relabel_blind.py collect outputs/blind -o scripts/data/first-set-blind-relabel.json
    python scripts/relabel_blind.py score scripts/data/first-set-blind-relabel.json --judge one-stage --judge two-stage

The shipped labels were written with both readers' readings and the prompt on the sheet; the
blind pass shows only the image (4x, numbered, in a seeded random order), so it repeats the
person's judgement without what primed it. ``score`` prints how often the two labellings give the
same object set (a 95% Wilson interval), and for each judge its agreement with the shipped labels,
with the blind ones, and on the images where both labellings agree (where the labels repeat).
docs/shapes-eval.md uses it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from distilsd.errors import InputError
from distilsd.shapes.labels import LABELLED_DIR, load_labels

PER_SHEET = 20
SCALE = 4


def sheets(args) -> None:
    labels = [label for label in load_labels(args.labelled) if label.clear]
    order = [label.file for label in labels]
    random.Random(args.seed).shuffle(order)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "order.json").write_text(json.dumps(order) + "\n")
    side = 64 * SCALE
    for start in range(0, len(order), PER_SHEET):
        sheet = Image.new("RGB", (side * 5, side * 4), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for k, name in enumerate(order[start : start + PER_SHEET]):
            image = Image.open(Path(args.labelled) / name).convert("RGB")
            x, y = (k % 5) * side, (k // 5) * side
            sheet.paste(image.resize((side - 8, side - 8), Image.Resampling.NEAREST), (x + 4, y + 4))
            draw.rectangle([x + 4, y + 4, x + 30, y + 20], fill=(255, 255, 255))
            draw.text((x + 6, y + 6), str(start + k), fill=(0, 0, 0))
        sheet.save(out / f"sheet-{start // PER_SHEET:02d}.png")
    print(f"{len(order)} images on {(len(order) + PER_SHEET - 1) // PER_SHEET} sheets -> {out}")


def collect(args) -> None:
    folder = Path(args.folder)
    order = json.loads((folder / "order.json").read_text())
    read: dict[str, list | None] = {}
    for number, line in enumerate((folder / "blind.txt").read_text().splitlines(), start=1):
        if not line.strip():
            continue
        index, _, rest = line.strip().partition(" ")
        if not index.isdigit() or int(index) >= len(order):
            raise InputError(f"blind.txt line {number}: {line!r} does not start with an image number")
        rest = rest.strip()
        if rest == "?":
            read[order[int(index)]] = None
        elif rest == "none":
            read[order[int(index)]] = []
        else:
            objects = [item.split() for item in rest.split(";")]
            if any(len(o) != 2 for o in objects):
                raise InputError(f"blind.txt line {number}: objects are 'colour shape' separated by ';'")
            read[order[int(index)]] = sorted(objects)
    missing = [name for name in order if name not in read]
    if missing:
        raise InputError(
            f"blind.txt has no line for {len(missing)} image(s), e.g. number {order.index(missing[0])}"
        )
    Path(args.output).write_text(json.dumps({"order_seed": args.seed, "labels": read}, indent=1) + "\n")
    print(f"{len(read)} blind labels -> {args.output}")


def score(args) -> None:
    from distilsd.evaluate.stats import proportion
    from distilsd.shapes.judge import load_judge, read_images

    blind = {name: (None if objects is None else sorted(map(tuple, objects)))
             for name, objects in json.loads(Path(args.relabel).read_text())["labels"].items()}  # fmt: skip
    labels = {label.file: label for label in load_labels(args.labelled) if label.file in blind}
    files = sorted(labels)
    both_clear = [f for f in files if blind[f] is not None]
    repeated = [f for f in both_clear if blind[f] == labels[f].pairs]

    def line(name: str, right: int, total: int) -> str:
        estimate = proportion(right, total)
        return f"{name}: {right}/{total} = {estimate.value:.3f} [{estimate.low:.3f}, {estimate.high:.3f}]"

    print(
        line("blind labels = shipped labels, of the images both call clear", len(repeated), len(both_clear))
    )
    print(line("blind labels = shipped labels, an image the blind pass calls unclear counted as differing",
               len(repeated), len(files)))  # fmt: skip
    images = [Image.open(Path(args.labelled) / f) for f in files]
    for judge_dir in args.judge:
        readings = read_images(load_judge(judge_dir), images)
        read = {f: sorted(d.pair for d in r.objects) for f, r in zip(files, readings, strict=True)}
        print(f"judge {judge_dir}")
        print("  " + line("= shipped labels", sum(read[f] == labels[f].pairs for f in files), len(files)))
        print("  " + line("= blind labels", sum(read[f] == blind[f] for f in both_clear), len(both_clear)))
        print(
            "  "
            + line(
                "= both, where they agree", sum(read[f] == labels[f].pairs for f in repeated), len(repeated)
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("sheets", help="shuffled, numbered sheets of the clear images")
    make.add_argument("-o", "--output", required=True)
    make.add_argument("--labelled", default=str(LABELLED_DIR))
    make.add_argument("--seed", type=int, default=2026, help="of the order")
    gather = commands.add_parser("collect", help="blind.txt and order.json -> one labels file")
    gather.add_argument("folder")
    gather.add_argument("-o", "--output", required=True)
    gather.add_argument("--seed", type=int, default=2026, help="the order's seed, recorded")
    compare = commands.add_parser("score", help="how the labels repeat, and judges against both")
    compare.add_argument("relabel")
    compare.add_argument("--labelled", default=str(LABELLED_DIR))
    compare.add_argument("--judge", action="append", default=[], help="judge folder or name (repeatable)")
    args = parser.parse_args()
    {"sheets": sheets, "collect": collect, "score": score}[args.command](args)


if __name__ == "__main__":
    try:
        main()
    except InputError as exc:  # a malformed blind.txt or judge folder: one line, no traceback
        sys.exit(f"error: {exc}")
