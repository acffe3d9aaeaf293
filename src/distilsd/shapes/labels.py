"""The labels of generated Shapes images: what each image holds, read from ``labels.jsonl``.

The data half of :mod:`distilsd.shapes.labelled` (which scores a judge against these labels):
it imports no judge, so the judge's training can read labelled folders without a cycle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from distilsd.errors import InputError
from distilsd.shapes.world import COLORS, SHAPES

LABELLED_DIR = Path(__file__).parent / "assets" / "labelled"  # the judge's check on generated images
# The same check on hexagons that DreamBooth LoRAs of `shapes-tiny` drew (the tuning prompts of
# `shapes eval-hexagon`, seed 505): where the judge is weakest, a shape no model drew before.
HEXAGON_LABELLED_DIR = Path(__file__).parent / "assets" / "labelled-hexagon"
SHIPPED_LABELLED_DIRS = (LABELLED_DIR, HEXAGON_LABELLED_DIR)  # the judge never trains on these
LABELS_NAME = "labels.jsonl"
UNNAMED_SHAPE = "other"  # an object that is none of the eight shapes


@dataclass(frozen=True)
class LabelledImage:
    file: str
    model: str
    prompt: str
    objects_asked: int
    objects: tuple[tuple[str, str, float, float], ...]  # colour, shape, centre x, centre y
    clear: bool
    labelled_by: str  # "both readers" or "eye"

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return sorted((color, shape) for color, shape, _, _ in self.objects)


def load_labels(folder: str | Path = LABELLED_DIR) -> list[LabelledImage]:
    """The labels of a labelled folder, checked: every image there, every object in the vocabulary."""
    from distilsd.shapes.captions import parse_caption

    folder = Path(folder)
    path = folder / LABELS_NAME
    if not path.is_file():
        raise InputError(f"{path} does not exist", hint="give a folder with labels.jsonl and its images")
    labels = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
            objects = tuple(
                (str(o[0]), str(o[1]), float(o[2]), float(o[3]))
                if len(o) == 4
                else (str(o[0]), str(o[1]), 0.5, 0.5)
                for o in record["objects"]
            )
            label = LabelledImage(
                file=str(record["file"]),
                model=str(record.get("model", "")),
                prompt=str(record.get("prompt", "")),
                objects_asked=int(record["objects_asked"]),
                objects=objects,
                clear=bool(record.get("clear", True)),
                labelled_by=str(record.get("labelled_by", "")),
            )
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise InputError(f"{where} is not a label record ({error})") from None
        for color, shape, x, y in label.objects:
            if color not in COLORS or (shape not in SHAPES and shape != UNNAMED_SHAPE):
                raise InputError(f"{where}: {color} {shape} is not a Shapes object")
            if not (0 <= x <= 1 and 0 <= y <= 1):
                raise InputError(f"{where}: centre ({x}, {y}) is outside the image")
        if label.clear and any(shape == UNNAMED_SHAPE for _, shape, _, _ in label.objects):
            raise InputError(f"{where}: a clear image cannot hold an object of shape {UNNAMED_SHAPE!r}")
        if label.prompt and (target := parse_caption(label.prompt)) is not None:
            if len(target.objects) != label.objects_asked:
                raise InputError(
                    f"{where}: objects_asked {label.objects_asked} but the prompt asks for {len(target.objects)}"
                )
        if not (folder / label.file).is_file():
            raise InputError(f"{where}: image {label.file} is missing")
        labels.append(label)
    if not labels:
        raise InputError(f"{path} holds no labels")
    return labels
