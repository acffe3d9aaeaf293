"""The labelled set of generated Shapes images, and how right a judge is on it.

Shipped in ``assets/labelled``: 320 images the shipped models generated for the held-out
prompts (teacher ``shapes`` and student ``shapes-tiny``, 80 one-object and 80 two-object
prompts each) and ``labels.jsonl``, the objects each image holds. ``assets/labelled-hexagon``
holds 240 more, labelled the same way: hexagons that four DreamBooth LoRAs of ``shapes-tiny``
drew for the tuning prompts of ``shapes eval-hexagon`` (seed 505), where a judge trained on
renders meets a shape no shipped model draws. The labels come from two
independent readers (the judge and :mod:`distilsd.shapes.classic`) where they agree, and
from a person who looked at every image where they disagree and at every agreement
(``scripts/label_shapes_images.py``; the rules are in ``docs/shapes-eval.md``).

An image is **clear** when a person can name every object in it as one of the eight shapes
in one of the eight colours; images holding malformed objects (beans, merged blobs, a
four-pointed shape between a cross and a diamond, two colours in one object) are kept with
a best guess (shape ``other`` where none fits) and ``"clear": false``, and the agreement
that counts is on the clear images.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from distilsd.shapes.labels import (  # noqa: F401 (the data half, also read from here)
    HEXAGON_LABELLED_DIR,
    LABELLED_DIR,
    LABELS_NAME,
    UNNAMED_SHAPE,
    LabelledImage,
    load_labels,
)


def label_reading(label: LabelledImage):
    """A label as a judge :class:`~distilsd.shapes.judge.Reading`, so that ``is_aligned`` can score it."""
    import numpy as np

    from distilsd.shapes.judge import Detection, Reading

    return Reading(
        [Detection(color, shape, x, y, 1.0, 1.0) for color, shape, x, y in label.objects], np.zeros(0)
    )


def _differences(wanted: list[tuple[str, str]], read: list[tuple[str, str]]) -> tuple[list, list]:
    """(pairs labelled but not read, pairs read but not labelled), each with repeats."""
    missed, extra = Counter(wanted) - Counter(read), Counter(read) - Counter(wanted)
    return list(missed.elements()), list(extra.elements())


def check_on_labelled(judge, folder: str | Path = LABELLED_DIR) -> dict:
    """How often ``judge`` reads exactly the labelled object set, and what its alignment verdicts are worth.

    Reported on the clear images (the headline, with a 95% Wilson interval) and on all;
    per model and prompt size; the shapes and colours it gets wrong (a shape taken for
    another where one object of a colour is missed and one of that colour read instead);
    and per model the 'exact' and 'contains' alignment the judge gives against the
    alignment the labels give, with how often the two verdicts are the same.
    """
    from PIL import Image

    from distilsd.evaluate.stats import proportion
    from distilsd.shapes.captions import parse_caption
    from distilsd.shapes.judge import ALIGNMENT_MODES, is_aligned, read_images

    folder = Path(folder)
    labels = load_labels(folder)
    readings = read_images(judge, [Image.open(folder / label.file) for label in labels])
    same = [
        label.pairs == sorted(d.pair for d in reading.objects)
        for label, reading in zip(labels, readings, strict=True)
    ]
    clear = [i for i, label in enumerate(labels) if label.clear]
    missed = extra = 0
    shape_mistakes: Counter = Counter()
    color_mistakes: Counter = Counter()
    missed_shapes: Counter = Counter()
    extra_shapes: Counter = Counter()
    for i in clear:
        gone, added = _differences(labels[i].pairs, sorted(d.pair for d in readings[i].objects))
        missed, extra = missed + len(gone), extra + len(added)
        for color, shape in list(gone):
            swap = next((p for p in added if p[0] == color), None) or next(
                (p for p in added if p[1] == shape), None
            )
            if swap is None:
                missed_shapes[shape] += 1
                continue
            added.remove(swap)
            if swap[0] == color:
                shape_mistakes[f"{shape} read as {swap[1]}"] += 1
            else:
                color_mistakes[f"{color} read as {swap[0]}"] += 1
        for _, shape in added:
            extra_shapes[shape] += 1

    def agreement(indices: list[int]) -> dict:
        estimate = proportion(sum(same[i] for i in indices), len(indices))
        return {
            "images": len(indices),
            "agreement": estimate.value,
            "interval": [estimate.low, estimate.high],
        }

    groups: dict[str, list[int]] = {}
    for i in clear:
        groups.setdefault(f"{labels[i].model}, {labels[i].objects_asked} obj", []).append(i)
    alignment: dict[str, dict] = {}
    for model in sorted({label.model for label in labels}):
        for objects_asked in sorted({label.objects_asked for label in labels}):
            indices = [
                i
                for i, label in enumerate(labels)
                if label.model == model and label.objects_asked == objects_asked
            ]
            targets = [parse_caption(labels[i].prompt) for i in indices]
            if not indices or any(target is None for target in targets):
                continue
            for mode in ALIGNMENT_MODES:
                by_judge = [is_aligned(readings[i], t, mode) for i, t in zip(indices, targets, strict=True)]
                by_labels = [
                    is_aligned(label_reading(labels[i]), t, mode)
                    for i, t in zip(indices, targets, strict=True)
                ]
                alignment.setdefault(model, {}).setdefault(f"{objects_asked} obj", {})[mode] = {
                    "images": len(indices),
                    "judge": sum(by_judge) / len(indices),
                    "labels": sum(by_labels) / len(indices),
                    "same_verdict": sum(a == b for a, b in zip(by_judge, by_labels, strict=True))
                    / len(indices),
                }
    return {
        "images": len(labels),
        "clear_images": len(clear),
        "object_set_agreement": agreement(clear)["agreement"],
        "object_set_agreement_interval": agreement(clear)["interval"],
        "object_set_agreement_all_images": agreement(list(range(len(labels))))["agreement"],
        "by_group": {name: agreement(indices) for name, indices in groups.items()},
        "objects_missed": missed,
        "objects_wrongly_read": extra,
        "shape_mistakes": dict(shape_mistakes.most_common()),
        "color_mistakes": dict(color_mistakes.most_common()),
        "missed_shapes": dict(missed_shapes.most_common()),
        "extra_shapes": dict(extra_shapes.most_common()),
        "alignment": alignment,
    }
