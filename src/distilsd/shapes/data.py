"""``distilsd shapes make-data``: the Shapes world as an ordinary text-to-image data set.

The layout is the one real data sets use (the diffusers / BK-SDM image folder)::

    DIR/images/000000.png ...
    DIR/metadata.jsonl      {"file_name": "images/000000.png", "text": "a red circle on the left", "scene": {...}}

so training goes through the same data path as LAION-style folders. ``scene`` holds the
ground truth (objects, colors, positions) for the judge and for analysis.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from distilsd.errors import InputError, OutputError
from distilsd.shapes.world import SHAPES, TRAIN_SHAPES, render, scene_for_index


def make_data(
    output_dir: str | Path,
    *,
    count: int,
    seed: int = 0,
    resolution: int = 64,
    two_object_fraction: float = 0.5,
    include_held_out: bool = False,
    shapes: tuple[str, ...] | list[str] = (),
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Render ``count`` captioned scenes into ``output_dir``; built in a temp folder, then renamed.

    ``shapes`` draws only those shapes (``("hexagon",)``: personalisation data for the shape
    every training set leaves out); default: the training shapes, all shapes with ``include_held_out``.
    """
    from tqdm.auto import tqdm

    if count < 1:
        raise InputError(f"--count {count} must be >= 1")
    if resolution < 16 or resolution % 8:
        raise InputError(f"--resolution {resolution} must be a multiple of 8, at least 16")
    if not 0.0 <= two_object_fraction <= 1.0:
        raise InputError(f"--two-object-fraction {two_object_fraction} must be in [0, 1]")
    output_dir = Path(output_dir)
    if output_dir.exists():
        if not overwrite:
            raise OutputError(
                f"{output_dir} already exists", hint="choose another folder, or pass --overwrite"
            )
    unknown = [shape for shape in shapes if shape not in SHAPES]
    if unknown:
        raise InputError(f"--shape {unknown[0]} is not a Shapes shape", hint="one of: " + ", ".join(SHAPES))
    shapes = tuple(shapes) or (SHAPES if include_held_out else TRAIN_SHAPES)
    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "images").mkdir(parents=True)
    with open(partial / "metadata.jsonl", "w", encoding="utf-8") as metadata:
        for index in tqdm(range(count), desc="rendering", disable=not progress):
            scene = scene_for_index(seed, index, two_object_fraction, shapes)
            file_name = f"images/{index:06d}.png"
            render(scene, resolution).save(partial / file_name)
            metadata.write(
                json.dumps({"file_name": file_name, "text": scene.caption, "scene": scene.to_json()}) + "\n"
            )
    info = {
        "count": count,
        "seed": seed,
        "resolution": resolution,
        "two_object_fraction": two_object_fraction,
        "shapes": list(shapes),
    }
    (partial / "shapes_dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    if output_dir.exists():
        shutil.rmtree(output_dir)
    partial.rename(output_dir)
    return output_dir
