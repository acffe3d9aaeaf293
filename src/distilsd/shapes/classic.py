"""A second, independent reader of Shapes images: colour segmentation and shape templates.

It shares nothing with the CNN judge (no training, no learnt weights): pixels far from the
background colour (the median of the image's border) are foreground, each connected
foreground region is split by the palette colour its inner pixels are nearest to, and each
region's shape is the one whose rendered outline (the polygons :func:`distilsd.shapes.world.render`
draws), placed on the region's centroid at the size its area implies, overlaps it best.

It is used to label generated images for checking the judge (``docs/shapes-eval.md``):
where the two readers disagree, a person looks at the image and decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from distilsd.shapes.world import COLORS, SHAPES, Scene, ShapeObject, render

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that makes a pixel foreground
MIN_AREA = 12  # pixels: smaller regions are specks
MIN_COLOR_SHARE = 0.3  # a colour holding less of a region's inner pixels is edge bleeding
PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # [8, 3]


@dataclass
class ClassicObject:
    color: str
    shape: str
    x: float  # centre, fraction of the side
    y: float
    area: int  # pixels
    overlap: float  # intersection over union with the best template
    # Area over the area of its convex hull: ~1 for convex shapes (a diamond, a circle), lower the
    # deeper the outline is pinched (a rendered cross 0.74, a star ~0.55). Tells the four-pointed
    # shapes the models draw for "cross" and "diamond" apart (docs/shapes-eval.md).
    solidity: float

    @property
    def pair(self) -> tuple[str, str]:
        return (self.color, self.shape)


def _mask(shape: str, x: float, y: float, radius: float, size: int = 64) -> np.ndarray:
    scene = Scene([ShapeObject(shape, "red", "small", x, y, radius)], "black")
    return np.asarray(render(scene, size=size))[:, :, 0] > 117  # red 220 over black 15: half coverage


@cache
def _template_geometry(shape: str) -> tuple[float, float, float]:
    """(area per squared radius, centroid x and y offset per radius) of a shape, in pixels."""
    radius = 0.3
    mask = _mask(shape, 0.5, 0.5, radius, size=256)
    ys, xs = np.nonzero(mask)
    scale = 256 * radius
    return len(xs) / scale**2, (xs.mean() + 0.5 - 128) / scale, (ys.mean() + 0.5 - 128) / scale


def _classify(region: np.ndarray) -> tuple[str, float, float, float]:
    """Best (shape, centre x, centre y, overlap) for a boolean [64, 64] region."""
    ys, xs = np.nonzero(region)
    cx, cy = (xs.mean() + 0.5) / 64, (ys.mean() + 0.5) / 64
    best = ("circle", cx, cy, -1.0)
    for shape in SHAPES:
        area_per_r2, off_x, off_y = _template_geometry(shape)
        radius_px = np.sqrt(len(xs) / area_per_r2)
        for factor in (0.9, 1.0, 1.1):
            r = radius_px * factor / 64
            x, y = cx - off_x * r, cy - off_y * r
            template = _mask(shape, x, y, r)
            overlap = (template & region).sum() / max((template | region).sum(), 1)
            if overlap > best[3]:
                best = (shape, x, y, float(overlap))
    return best


def solidity(region: np.ndarray) -> float:
    """Pixels of a boolean region over the area of the convex hull of those pixels' squares."""
    from scipy.spatial import ConvexHull

    ys, xs = np.nonzero(region)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)])
    return float(len(xs) / ConvexHull(corners.astype(np.float64)).volume)


class ClassicReading:
    """The classical reader's objects in the shape :func:`distilsd.shapes.judge.is_aligned` reads
    (a judge ``Reading``'s ``objects`` and ``best``), so both readers get the same verdicts."""

    def __init__(self, objects: list[ClassicObject]):
        self.objects = objects

    def best(self, pair: tuple[str, str]) -> ClassicObject | None:
        return next((o for o in self.objects if o.pair == pair), None)


def read_classic(image) -> list[ClassicObject]:
    """The objects in a 64 px Shapes image (PIL), largest first."""
    from PIL import Image
    from scipy import ndimage

    rgb = image.convert("RGB")
    if rgb.size != (64, 64):
        rgb = rgb.resize((64, 64), Image.Resampling.BILINEAR)
    pixels = np.asarray(rgb, dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    foreground = np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE
    nearest = np.linalg.norm(pixels[:, :, None, :] - PALETTE[None, None], axis=-1).argmin(axis=-1)  # [64, 64]
    regions, count = ndimage.label(foreground)
    found: list[ClassicObject] = []
    names = list(COLORS)
    for label in range(1, count + 1):
        region = regions == label
        if region.sum() < MIN_AREA:
            continue
        inner = ndimage.binary_erosion(region)
        votes = np.bincount(
            nearest[inner if inner.sum() >= MIN_AREA // 2 else region], minlength=len(PALETTE)
        )
        colors = [
            c for c in np.argsort(-votes) if votes[c] >= max(MIN_COLOR_SHARE * votes.sum(), MIN_AREA // 2)
        ]
        if not colors:
            continue
        # Split a region of two touching objects by colour: each pixel to the nearest kept colour.
        distances = np.linalg.norm(pixels[:, :, None, :] - PALETTE[colors][None, None], axis=-1)
        owner = np.asarray(colors)[distances.argmin(axis=-1)]
        for color in colors:
            part = region & (owner == color)
            if len(colors) > 1:
                part = ndimage.binary_opening(part)
            if part.sum() < MIN_AREA:
                continue
            shape, x, y, overlap = _classify(part)
            found.append(
                ClassicObject(
                    names[color], shape, float(x), float(y), int(part.sum()), overlap, solidity(part)
                )
            )
    return sorted(found, key=lambda o: -o.area)
