"""The Shapes world: seeded scenes of one or two flat shapes, rendered and captioned.

Everything is a pure function of a seed, so a data set, a held-out prompt set or a test
fixture is reproduced exactly from its seed. Scenes are rendered at 4x and downsampled, so
edges are anti-aliased like a photo's rather than jagged.

Coordinates are fractions of the image side: (0, 0) is the top left corner.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "heart", "hexagon")
# Kept out of the training data so that personalisation (DreamBooth / LoRA) can teach it later.
HELD_OUT_SHAPES = ("hexagon",)
TRAIN_SHAPES = tuple(s for s in SHAPES if s not in HELD_OUT_SHAPES)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 230),
    "yellow": (245, 220, 30),
    "orange": (250, 135, 20),
    "purple": (135, 50, 190),
    "pink": (250, 120, 190),
    "cyan": (40, 210, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.10, 0.14),
    "large": (0.19, 0.25),
}  # radius, fraction of the side

# Where a stated position puts an object's centre when sampling, and what the judge accepts.
POSITIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    # name: ((x range), (y range)) used for sampling
    "left": ((0.22, 0.36), (0.25, 0.75)),
    "right": ((0.64, 0.78), (0.25, 0.75)),
    "top": ((0.25, 0.75), (0.22, 0.36)),
    "bottom": ((0.25, 0.75), (0.64, 0.78)),
    "center": ((0.44, 0.56), (0.44, 0.56)),
}
RELATIONS = ("left of", "right of", "above", "below", "and")


@dataclass
class ShapeObject:
    shape: str
    color: str
    size: str
    x: float
    y: float
    radius: float
    position: str | None = None  # stated in the caption, if any


@dataclass
class Scene:
    objects: list[ShapeObject]
    background: str
    relation: str | None = None  # for two objects: how the caption relates the first to the second
    caption: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Scene:
        return cls(
            objects=[ShapeObject(**o) for o in data["objects"]],
            background=data["background"],
            relation=data.get("relation"),
            caption=data.get("caption", ""),
        )


# ---- sampling -------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _describe(obj: ShapeObject, rng: random.Random, with_size: bool) -> str:
    words = ([obj.size] if with_size else []) + [obj.color, obj.shape]
    return f"{_article(words[0])} {' '.join(words)}"


def _place(rng: random.Random, radius: float, position: str | None) -> tuple[float, float]:
    if position is not None:
        (x0, x1), (y0, y1) = POSITIONS[position]
    else:
        x0 = y0 = radius + 0.03
        x1 = y1 = 1 - radius - 0.03
    return rng.uniform(x0, x1), rng.uniform(y0, y1)


def _random_object(
    rng: random.Random, shapes: tuple[str, ...], position: str | None = None, taken=()
) -> ShapeObject:
    while True:
        shape, color = rng.choice(shapes), rng.choice(list(COLORS))
        if (shape, color) not in taken:
            break
    size = rng.choice(list(SIZES))
    radius = rng.uniform(*SIZES[size])
    x, y = _place(rng, radius, position)
    return ShapeObject(shape, color, size, x, y, radius, position)


def sample_scene(rng: random.Random, num_objects: int, shapes: tuple[str, ...] = TRAIN_SHAPES) -> Scene:
    """A random scene of ``num_objects`` (1 or 2) objects with a caption from varied templates."""
    background = rng.choice(list(BACKGROUNDS))
    if num_objects == 1:
        position = rng.choice([None, None, "left", "right", "top", "bottom", "center"])
        obj = _random_object(rng, shapes, position)
        with_size = rng.random() < 0.5
        thing = _describe(obj, rng, with_size)
        if position is None:
            template = rng.choice(
                ["{thing}", "{thing} on a {bg} background", "a picture of {thing}", "{thing}, flat colors"]
            )
        elif position == "center":
            template = rng.choice(["{thing} in the center", "{thing} in the middle"])
        else:
            on = "on" if position in ("left", "right") else "at"
            template = rng.choice(
                [
                    f"{{thing}} {on} the {{pos}}",
                    "{thing} at the {pos}",
                    f"{{thing}} {on} the {{pos}} on a {{bg}} background",
                ]
            )
        caption = template.format(thing=thing, pos=position, bg=background)
        return Scene([obj], background, None, caption)

    if num_objects != 2:
        raise ValueError("scenes have one or two objects")
    relation = rng.choice(RELATIONS)
    first = _random_object(rng, shapes)
    second = _random_object(rng, shapes, taken={(first.shape, first.color)})
    # Re-place the pair so that they do not overlap and the stated relation clearly holds.
    for attempt in range(2000):
        if attempt and attempt % 200 == 0:
            # Two large objects may not fit with the relation: make the larger one small.
            big = max((first, second), key=lambda o: o.radius)
            big.size, big.radius = "small", rng.uniform(*SIZES["small"])
        for obj in (first, second):
            obj.x, obj.y = _place(rng, obj.radius, None)
        dx, dy = second.x - first.x, second.y - first.y
        apart = math.hypot(dx, dy) > first.radius + second.radius + 0.06
        clear = {
            "left of": dx > 0.25 and abs(dy) < abs(dx),
            "right of": dx < -0.25 and abs(dy) < abs(dx),
            "above": dy > 0.25 and abs(dx) < abs(dy),
            "below": dy < -0.25 and abs(dx) < abs(dy),
            "and": True,
        }[relation]
        if apart and clear:
            break
    else:
        raise RuntimeError("could not place two objects")  # unreachable with two small objects
    with_size = rng.random() < 0.3
    a, b = _describe(first, rng, with_size), _describe(second, rng, with_size)
    if relation == "and":
        caption = rng.choice(["{a} and {b}", "{a} next to {b}", "{a} and {b} on a {bg} background"])
    elif relation in ("left of", "right of"):
        side = relation.split()[0]
        caption = rng.choice(["{a} to the {side} of {b}", "{a} on the {side} of {b}"]).replace("{side}", side)
    else:
        caption = rng.choice(["{a} {rel} {b}"]).replace("{rel}", relation)
    caption = caption.format(a=a, b=b, bg=background)
    return Scene([first, second], background, relation, caption)


def scene_for_index(
    seed: int, index: int, two_object_fraction: float = 0.5, shapes: tuple[str, ...] = TRAIN_SHAPES
) -> Scene:
    """Scene ``index`` of the data set with ``seed``: independent of how many others are made."""
    rng = random.Random(f"shapes-{seed}-{index}")
    num_objects = 2 if rng.random() < two_object_fraction else 1
    return sample_scene(rng, num_objects, shapes)


# ---- rendering ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeStyle:
    """How loosely one object is drawn: the judge trains on such variants of the canonical shapes.

    The Shapes models draw fatter or thinner stars, crosses as four-pointed sparkles, rounded
    corners and slightly turned or stretched outlines; the default style is the canonical render.
    """

    star_inner: float = 0.45  # a star's inner radius over its outer radius
    cross_width: float = 0.32  # half the width of a cross's arm over the radius
    sparkle: float = 0.0  # > 0: a cross drawn as a four-pointed star with this inner radius over outer
    rotation: float = 0.0  # radians, about the centre
    stretch: float = 1.0  # the x extent is multiplied by this, the y extent divided
    rounding: float = 0.0  # corners rounded by blurring the outline this much (fraction of the radius)


CANONICAL = ShapeStyle()


def _polygon(
    shape: str, cx: float, cy: float, r: float, style: ShapeStyle = CANONICAL
) -> list[tuple[float, float]] | None:
    def ring(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [
            (
                cx + radius * math.cos(phase + 2 * math.pi * k / n),
                cy + radius * math.sin(phase + 2 * math.pi * k / n),
            )
            for k in range(n)
        ]

    def styled(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        if style.rotation == 0.0 and style.stretch == 1.0:
            return points
        cos, sin = math.cos(style.rotation), math.sin(style.rotation)
        return [
            (
                cx + ((x - cx) * cos - (y - cy) * sin) * style.stretch,
                cy + ((x - cx) * sin + (y - cy) * cos) / style.stretch,
            )
            for x, y in points
        ]

    if shape == "square":
        s = r * 0.85
        return styled([(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)])
    if shape == "diamond":
        return styled(ring(4, r, -math.pi / 2))
    if shape == "triangle":
        return styled(ring(3, r, -math.pi / 2))
    if shape == "hexagon":
        return styled(ring(6, r, 0.0))
    if shape == "star":
        outer, inner = ring(5, r, -math.pi / 2), ring(5, r * style.star_inner, -math.pi / 2 + math.pi / 5)
        return styled([p for pair in zip(outer, inner) for p in pair])
    if shape == "cross" and style.sparkle > 0:
        outer, inner = ring(4, r, -math.pi / 2), ring(4, r * style.sparkle, -math.pi / 4)
        return styled([p for pair in zip(outer, inner) for p in pair])
    if shape == "cross":
        a, b = r * 0.9, r * style.cross_width
        return styled([(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b), (cx + b, cy + b),
                (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b)])  # fmt: skip
    if shape == "heart":
        points = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            hx = 16 * math.sin(t) ** 3
            hy = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((cx + r * hx / 17, cy - r * (hy + 2) / 17))
        return styled(points)
    return None  # circle


def render(scene: Scene, size: int = 64, supersample: int = 4, styles: list[ShapeStyle] | None = None):
    """Render ``scene`` as a ``size`` x ``size`` RGB PIL image; ``styles``: one per object (default canonical)."""
    from PIL import Image, ImageDraw, ImageFilter

    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj, style in zip(scene.objects, styles or [CANONICAL] * len(scene.objects), strict=True):
        cx, cy, r = obj.x * big, obj.y * big, obj.radius * big
        polygon = _polygon(obj.shape, cx, cy, r, style)
        if style.rounding > 0:  # drawn as a mask, blurred and thresholded again: rounded corners
            mask = Image.new("L", (big, big), 0)
            outline = ImageDraw.Draw(mask)
        else:
            mask, outline = None, draw
        fill = 255 if mask is not None else COLORS[obj.color]
        if polygon is None:
            rx, ry = r * style.stretch, r / style.stretch
            outline.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
        else:
            outline.polygon(polygon, fill=fill)
        if mask is not None:
            mask = mask.filter(ImageFilter.GaussianBlur(style.rounding * r)).point(
                lambda v: 255 if v >= 128 else 0
            )
            image.paste(COLORS[obj.color], mask=mask)
    return image.resize((size, size), Image.Resampling.LANCZOS)
