"""The Shapes world: distilsd's own synthetic text-to-image domain.

- :mod:`.world`: seeded scenes of one or two shapes, rendered and captioned;
- :mod:`.data`: ``distilsd shapes make-data``, the world as an image folder + metadata.jsonl;
- :mod:`.judge`: a small CNN that reads generated images (alignment, Shapes-FID);
- :mod:`.evaluate`: ``distilsd shapes eval``, a model scored on held-out prompts.
"""

from distilsd.shapes.captions import PromptTarget, parse_caption
from distilsd.shapes.world import (
    COLORS,
    HELD_OUT_SHAPES,
    SHAPES,
    TRAIN_SHAPES,
    Scene,
    render,
    sample_scene,
    scene_for_index,
)

__all__ = [
    "COLORS",
    "HELD_OUT_SHAPES",
    "SHAPES",
    "TRAIN_SHAPES",
    "PromptTarget",
    "Scene",
    "parse_caption",
    "render",
    "sample_scene",
    "scene_for_index",
]
