"""Reading a Shapes caption back into what it asks for, so any prompt can be judged."""

from __future__ import annotations

import re
from dataclasses import dataclass

from distilsd.shapes.world import COLORS, SHAPES

_OBJECT = re.compile(
    r"\b(?:a|an)\s+(?:(small|large)\s+)?(" + "|".join(COLORS) + r")\s+(" + "|".join(SHAPES) + r")\b"
)
_POSITION = re.compile(r"\b(?:on|at)\s+the\s+(left|right|top|bottom)\b|\bin\s+the\s+(center|middle)\b")
_RELATION = re.compile(
    r"\b(to the left of|on the left of|to the right of|on the right of|above|below|and|next to)\b"
)


@dataclass(frozen=True)
class PromptTarget:
    """What a prompt asks for: one or two (color, shape) objects, a position or a relation."""

    objects: tuple[tuple[str, str], ...]  # (color, shape)
    position: str | None = None  # single object: left/right/top/bottom/center
    relation: str | None = None  # two objects: "left of", "right of", "above", "below", "and"


def parse_caption(text: str) -> PromptTarget | None:
    """The target of a Shapes caption, or None when the text names no Shapes object."""
    text = text.lower()
    matches = list(_OBJECT.finditer(text))
    if not matches:
        return None
    objects = tuple((m.group(2), m.group(3)) for m in matches[:2])
    if len(objects) == 1:
        found = _POSITION.search(text, matches[0].end())
        position = None if found is None else (found.group(1) or "center")
        return PromptTarget(objects, position=position)
    between = text[matches[0].end() : matches[1].start()]
    found = _RELATION.search(between)
    relation = "and"
    if found:
        word = found.group(1)
        relation = {"to the left of": "left of", "on the left of": "left of", "to the right of": "right of",
                    "on the right of": "right of", "above": "above", "below": "below"}.get(word, "and")  # fmt: skip
    return PromptTarget(objects, relation=relation)
