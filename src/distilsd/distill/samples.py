"""A small synthetic image-caption set (coloured shapes drawn with PIL) for tests and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle", "cross")


def write_shapes_folder(path: str | Path, num_images: int = 16, size: int = 64, seed: int = 0) -> Path:
    """Write ``num_images`` PNGs of a coloured shape on a plain background and ``metadata.jsonl``."""
    import random

    from PIL import Image, ImageDraw

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(num_images):
        colour_name = list(COLOURS)[i % len(COLOURS)]
        shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        background = tuple(rng.randint(0, 60) + 190 for _ in range(3))
        # Not square, so that resizing and cropping are exercised.
        image = Image.new("RGB", (size + size // 4, size), background)
        draw = ImageDraw.Draw(image)
        margin = rng.randint(size // 8, size // 4)
        box = (margin + size // 8, margin, size + size // 8 - margin, size - margin)
        fill = COLOURS[colour_name]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
        else:
            mid_x, mid_y, w = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2, size // 10
            draw.rectangle((box[0], mid_y - w, box[2], mid_y + w), fill=fill)
            draw.rectangle((mid_x - w, box[1], mid_x + w, box[3]), fill=fill)
        name = f"{i:04d}.png"
        image.save(path / name)
        lines.append(json.dumps({"file_name": name, "text": f"a {colour_name} {shape}"}))
    (path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return path
