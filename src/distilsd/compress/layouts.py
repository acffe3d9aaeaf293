"""Student layouts: which teacher layers a BK-SDM-style student keeps, as data.

A layout is derived from the teacher's U-Net config, never hard-coded per SD version, so the
same preset works for SD v1.x, SD v2.x and any scaled-down teacher of the same topology.

Vocabulary (diffusers' ``UNet2DConditionModel``):

- a *stage* is one resolution level: ``down_blocks[i]`` and its mirror ``up_blocks[N-1-i]``;
- a *layer* of a block is one resnet (plus its attention in cross-attention blocks);
  a teacher down block has ``layers_per_block[i]`` layers, an up block one more (the extra
  layer consumes the skip connection from the block before).

A student keeps, per down block, some teacher layer indices; per up block, one more; the mid
block or not; and may drop the innermost stages (BK-SDM-Tiny drops one). diffusers can only
express "an up block has one layer more than its mirror down block", which is exactly the
skip-connection count a U-Net needs, so layouts are checked against that before any weights
are touched.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distilsd.errors import InputError

PRESET_DESCRIPTIONS: dict[str, str] = {
    "bk-base": "BK-SDM-Base: first layer of every down block, first and last of every up block",
    "bk-small": "BK-SDM-Small: bk-base without the mid block",
    "bk-tiny": "BK-SDM-Tiny: bk-small without the innermost stage (3 stages for SD)",
}

# Students we know of but whose layout public material does not pin down: named in errors.
UNCONFIRMED_PRESETS: dict[str, str] = {
    "ofa-small": (
        "OFA small-stable-diffusion is not a preset: its model card says only 'layers_per_block=1, first layer "
        "of each block from SD v1.4', and its config could not be checked"
    ),
}

# Other names people use for the same students (segmind's distill-sd, the nota-ai hub ids).
PRESET_ALIASES: dict[str, str] = {
    "bk-sdm-base": "bk-base",
    "bk-sdm-small": "bk-small",
    "bk-sdm-tiny": "bk-tiny",
    "sd-small": "bk-base",  # segmind "sd_small" keeps the mid block: it is BK-SDM-Base
    "sd-tiny": "bk-tiny",
}

SPEC_KEYS = ("name", "base", "down_layers", "up_layers", "mid_block", "drop_stages")

CROSS_ATTENTION_BLOCK_PREFIX = "CrossAttn"


def preset_names() -> list[str]:
    return list(PRESET_DESCRIPTIONS)


@dataclass(frozen=True)
class StudentLayout:
    """Which teacher layers a student keeps.

    Attributes:
        name: preset name or the name given in a custom spec.
        down_layers: per student down block ``i`` (= teacher ``down_blocks[i]``), the teacher
            layer indices it keeps, in order.
        up_layers: per student up block ``i`` (= teacher ``up_blocks[i + drop_stages]``), the
            teacher layer indices it keeps, in order.
        mid_block: whether the teacher's mid block is kept.
        drop_stages: how many innermost stages are removed (down blocks, the downsampler
            before them, and their mirror up blocks).
        teacher_config: the teacher U-Net config the layout was checked against.
    """

    name: str
    down_layers: tuple[tuple[int, ...], ...]
    up_layers: tuple[tuple[int, ...], ...]
    mid_block: bool
    drop_stages: int = 0
    teacher_config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_stages(self) -> int:
        return len(self.down_layers)

    @property
    def num_teacher_stages(self) -> int:
        return self.num_stages + self.drop_stages

    def teacher_up_block(self, student_up_block: int) -> int:
        """Index of the teacher up block that student ``up_blocks[i]`` is made from."""
        return student_up_block + self.drop_stages

    @property
    def feature_pairs(self) -> list[tuple[str, str]]:
        """(teacher module name, student module name) pairs matched in feature distillation.

        Every kept down and up block is matched on its output (BK-SDM; the mid block is not
        matched). When stages are dropped, the last kept down block loses its downsampler in
        the student, so it is matched before downsampling: on the output projection of its
        last attention (BK-SDM-Tiny), or on its last resnet in a block without attention.
        """
        teacher_types = self.teacher_config.get("down_block_types", ())
        pairs: list[tuple[str, str]] = []
        for i, kept in enumerate(self.down_layers):
            if self.drop_stages and i == self.num_stages - 1:
                teacher_last = _teacher_down_layers(self.teacher_config)[i] - 1
                if teacher_types and teacher_types[i].startswith(CROSS_ATTENTION_BLOCK_PREFIX):
                    pairs.append(
                        (
                            f"down_blocks.{i}.attentions.{teacher_last}.proj_out",
                            f"down_blocks.{i}.attentions.{len(kept) - 1}.proj_out",
                        )
                    )
                else:
                    pairs.append(
                        (
                            f"down_blocks.{i}.resnets.{teacher_last}",
                            f"down_blocks.{i}.resnets.{len(kept) - 1}",
                        )
                    )
            else:
                pairs.append((f"down_blocks.{i}", f"down_blocks.{i}"))
        for i in range(len(self.up_layers)):
            pairs.append((f"up_blocks.{self.teacher_up_block(i)}", f"up_blocks.{i}"))
        return pairs

    @property
    def removed_modules(self) -> list[str]:
        """Teacher modules that have no counterpart in the student."""
        config = self.teacher_config
        down_counts = _teacher_down_layers(config)
        num_teacher = self.num_teacher_stages
        has_attention = _down_has_attention(config)
        removed: list[str] = []
        for i in range(num_teacher):
            if i >= self.num_stages:
                removed.append(f"down_blocks.{i}")
                continue
            for layer in range(down_counts[i]):
                if layer not in self.down_layers[i]:
                    removed.append(f"down_blocks.{i}.resnets.{layer}")
                    if has_attention[i]:
                        removed.append(f"down_blocks.{i}.attentions.{layer}")
            if self.drop_stages and i == self.num_stages - 1:
                removed.append(f"down_blocks.{i}.downsamplers")
        if not self.mid_block and config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
            removed.append("mid_block")
        up_has_attention = _up_has_attention(config)
        for t in range(num_teacher):
            if t < self.drop_stages:
                removed.append(f"up_blocks.{t}")
                continue
            kept = self.up_layers[t - self.drop_stages]
            for layer in range(down_counts[num_teacher - 1 - t] + 1):
                if layer not in kept:
                    removed.append(f"up_blocks.{t}.resnets.{layer}")
                    if up_has_attention[t]:
                        removed.append(f"up_blocks.{t}.attentions.{layer}")
        return removed

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "down_layers": [list(layers) for layers in self.down_layers],
            "up_layers": [list(layers) for layers in self.up_layers],
            "mid_block": self.mid_block,
            "drop_stages": self.drop_stages,
        }


def _teacher_down_layers(config: Mapping[str, Any]) -> list[int]:
    """Layers per teacher down block (diffusers accepts an int or a per-block list)."""
    num_blocks = len(config["down_block_types"])
    layers = config.get("layers_per_block", 2)
    return [int(layers)] * num_blocks if isinstance(layers, int) else [int(n) for n in layers]


def _down_has_attention(config: Mapping[str, Any]) -> list[bool]:
    return [name.startswith(CROSS_ATTENTION_BLOCK_PREFIX) for name in config["down_block_types"]]


def _up_has_attention(config: Mapping[str, Any]) -> list[bool]:
    return [name.startswith(CROSS_ATTENTION_BLOCK_PREFIX) for name in config["up_block_types"]]


def check_teacher_config(config: Mapping[str, Any]) -> None:
    """Refuse configs that are not a diffusers UNet2DConditionModel with SD-style blocks."""
    class_name = config.get("_class_name", "UNet2DConditionModel")
    if class_name != "UNet2DConditionModel":
        raise InputError(
            f"the teacher is a {class_name}, not a UNet2DConditionModel",
            hint="give an SD 1.x/2.x pipeline folder, its unet/ folder or hub id",
        )
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
        if key not in config:
            raise InputError(
                f"the teacher U-Net config has no '{key}'",
                hint="is this a diffusers UNet2DConditionModel config?",
            )
    if len(config["down_block_types"]) != len(config["up_block_types"]):
        raise InputError("the teacher U-Net has different numbers of down and up blocks")


def _preset_layout(name: str, config: Mapping[str, Any]) -> StudentLayout:
    down_counts = _teacher_down_layers(config)
    num_stages = len(down_counts)
    # Down blocks keep their first layer. Up blocks keep their first and last layer: the last
    # one is the only layer whose skip input (from the block before) fits the student's last
    # slot, so its weights carry over unchanged.
    down_layers = tuple((0,) for _ in range(num_stages))
    up_layers = tuple((0, down_counts[num_stages - 1 - i]) for i in range(num_stages))
    if name == "bk-base":
        return StudentLayout(name, down_layers, up_layers, mid_block=True, drop_stages=0)
    if name == "bk-small":
        return StudentLayout(name, down_layers, up_layers, mid_block=False, drop_stages=0)
    if name == "bk-tiny":
        return StudentLayout(name, down_layers[:-1], up_layers[1:], mid_block=False, drop_stages=1)
    raise AssertionError(name)


def normalize_preset_name(name: str) -> str | None:
    """The canonical preset name for ``name`` (aliases, '_' or '-'), or None."""
    key = name.strip().lower().replace("_", "-")
    key = PRESET_ALIASES.get(key, key)
    return key if key in PRESET_DESCRIPTIONS else None


def load_spec_file(path: str | Path) -> dict[str, Any]:
    """Read a custom layout spec from a YAML or JSON file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"layout spec file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            spec = json.loads(text)
        else:
            import yaml

            spec = yaml.safe_load(text)
    except (ValueError, Exception) as exc:  # yaml.YAMLError and json errors
        raise InputError(f"cannot parse layout spec {path}: {exc}".splitlines()[0]) from exc
    if not isinstance(spec, dict):
        raise InputError(f"layout spec {path} must be a mapping with keys {', '.join(SPEC_KEYS)}")
    spec.setdefault("name", path.stem)
    return spec


def _as_index_lists(value: Any, key: str, expected_blocks: int, kind: str) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, (list, tuple)):
        raise InputError(
            f"layout spec: '{key}' must be a list with one list of layer indices per {kind} block"
        )
    if len(value) != expected_blocks:
        raise InputError(
            f"layout spec: '{key}' lists {len(value)} blocks, but the student has {expected_blocks} {kind} blocks",
            hint="give one list of teacher layer indices per kept block",
        )
    lists = []
    for i, layers in enumerate(value):
        if isinstance(layers, int):
            layers = [layers]
        if not isinstance(layers, (list, tuple)) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in layers
        ):
            raise InputError(
                f"layout spec: {kind}_blocks.{i} in '{key}' must be a list of integer layer indices, got {layers!r}"
            )
        lists.append(tuple(layers))
    return tuple(lists)


def layout_from_spec(spec: Mapping[str, Any], teacher_config: Mapping[str, Any]) -> StudentLayout:
    """Build a layout from a custom spec (a mapping, as read from YAML/JSON).

    Keys: ``name``, ``base`` (a preset to start from), ``down_layers`` (teacher layer indices
    kept per down block), ``up_layers`` (per up block; by default the first n and the last
    layer, where n is what the mirror down block keeps), ``mid_block`` (bool),
    ``drop_stages`` (innermost stages removed). Unknown keys are errors.
    """
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise InputError(
            f"layout spec: unknown key(s) {', '.join(unknown)}", hint=f"known keys: {', '.join(SPEC_KEYS)}"
        )
    down_counts = _teacher_down_layers(teacher_config)
    num_teacher = len(down_counts)

    if spec.get("base") is not None:
        base_name = normalize_preset_name(str(spec["base"]))
        if base_name is None:
            raise InputError(
                f"layout spec: unknown base preset '{spec['base']}'",
                hint=f"presets: {', '.join(preset_names())}",
            )
        base = _preset_layout(base_name, teacher_config)
    else:
        base = StudentLayout(
            "custom",
            tuple(tuple(range(n)) for n in down_counts),
            tuple(tuple(range(down_counts[num_teacher - 1 - i] + 1)) for i in range(num_teacher)),
            mid_block=True,
        )

    drop_stages = spec.get("drop_stages", base.drop_stages)
    if (
        not isinstance(drop_stages, int)
        or isinstance(drop_stages, bool)
        or not 0 <= drop_stages < num_teacher
    ):
        raise InputError(
            f"layout spec: 'drop_stages' must be an integer from 0 to {num_teacher - 1}, got {drop_stages!r}"
        )
    num_stages = num_teacher - drop_stages

    mid_block = spec.get("mid_block", base.mid_block)
    if not isinstance(mid_block, bool):
        raise InputError(f"layout spec: 'mid_block' must be true or false, got {mid_block!r}")

    if "down_layers" in spec:
        down_layers = _as_index_lists(spec["down_layers"], "down_layers", num_stages, "down")
    elif drop_stages == base.drop_stages:
        down_layers = base.down_layers
    else:
        down_layers = tuple(tuple(range(n)) for n in down_counts[:num_stages])

    if "up_layers" in spec:
        up_layers = _as_index_lists(spec["up_layers"], "up_layers", num_stages, "up")
    elif "down_layers" not in spec and drop_stages == base.drop_stages:
        up_layers = base.up_layers
    else:
        # Mirror the down blocks: the first n layers and the last one (BK-SDM's rule).
        up_layers = []
        for i in range(num_stages):
            n = len(down_layers[num_stages - 1 - i])
            teacher_last = down_counts[num_stages - 1 - i]
            up_layers.append(tuple(range(min(n, teacher_last))) + (teacher_last,))
        up_layers = tuple(up_layers)

    name = str(spec.get("name") or (base.name if spec.get("base") is not None else "custom"))
    return StudentLayout(name, down_layers, up_layers, mid_block=mid_block, drop_stages=drop_stages)


def _down_slot(channels: list[int], block: int, slot: int) -> tuple[int, int]:
    block_in = channels[block - 1] if block > 0 else channels[0]
    return (block_in if slot == 0 else channels[block], channels[block])


def _up_slot(channels: list[int], up_block: int, slot: int, num_slots: int) -> tuple[int, int, int]:
    reversed_channels = list(reversed(channels))
    out_channels = reversed_channels[up_block]
    prev_output = reversed_channels[max(up_block - 1, 0)]
    block_in = reversed_channels[min(up_block + 1, len(channels) - 1)]
    resnet_in = prev_output if slot == 0 else out_channels
    skip = block_in if slot == num_slots - 1 else out_channels
    return (resnet_in, skip, out_channels)


def validate_layout(layout: StudentLayout, teacher_config: Mapping[str, Any]) -> StudentLayout:
    """Check that ``layout`` wires up as a U-Net and that every kept teacher layer fits its slot.

    Returns the layout bound to ``teacher_config``. Raises InputError naming the block.
    """
    check_teacher_config(teacher_config)
    down_counts = _teacher_down_layers(teacher_config)
    num_teacher = len(down_counts)
    if not 0 <= layout.drop_stages < num_teacher:
        raise InputError(
            f"layout '{layout.name}' drops {layout.drop_stages} stages, but the teacher has {num_teacher}"
        )
    num_stages = num_teacher - layout.drop_stages
    if len(layout.down_layers) != num_stages or len(layout.up_layers) != num_stages:
        raise InputError(
            f"layout '{layout.name}' has {len(layout.down_layers)} down and {len(layout.up_layers)} up blocks, "
            f"but a teacher with {num_teacher} stages minus {layout.drop_stages} dropped leaves {num_stages}"
        )
    if layout.mid_block and teacher_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None:
        raise InputError(
            f"layout '{layout.name}' keeps the mid block, but the teacher has none",
            hint="set mid_block: false",
        )

    teacher_channels = list(teacher_config["block_out_channels"])
    student_channels = teacher_channels[:num_stages]

    if layout.mid_block and teacher_channels[num_stages - 1] != teacher_channels[-1]:
        raise InputError(
            f"mid_block: the teacher's mid block has {teacher_channels[-1]} channels, but after dropping "
            f"{layout.drop_stages} stages the innermost block has {teacher_channels[num_stages - 1]}",
            hint="set mid_block: false",
        )

    for i, kept in enumerate(layout.down_layers):
        block = f"down_blocks.{i}"
        if not kept:
            raise InputError(f"{block} keeps no layer", hint="a down block needs at least one resnet")
        for layer in kept:
            if not 0 <= layer < down_counts[i]:
                raise InputError(
                    f"{block} keeps teacher layer {layer}, but the teacher's {block} has layers 0..{down_counts[i] - 1}"
                )
        if list(kept) != sorted(set(kept)):
            raise InputError(
                f"{block} keeps layers {list(kept)}: give distinct teacher layer indices in increasing order"
            )
        for slot, layer in enumerate(kept):
            student_in, _ = _down_slot(student_channels, i, slot)
            teacher_in, _ = _down_slot(teacher_channels, i, layer)
            if student_in != teacher_in:
                raise InputError(
                    f"{block}: student layer {slot} would be teacher resnets.{layer}, which takes {teacher_in} input channels, "
                    f"but that slot receives {student_in}",
                    hint=f"keep layer 0 first in {block}",
                )

    for i, kept in enumerate(layout.up_layers):
        block = f"up_blocks.{i}"
        teacher_block = layout.teacher_up_block(i)
        teacher_name = f"teacher up_blocks.{teacher_block}"
        mirror = num_stages - 1 - i
        teacher_slots = down_counts[num_teacher - 1 - teacher_block] + 1
        needed = len(layout.down_layers[mirror]) + 1
        # One skip connection per layer of the mirror down block, plus the one from the stage above.
        if len(kept) != needed:
            raise InputError(
                f"{block} keeps {len(kept)} layers, but its mirror down_blocks.{mirror} keeps "
                f"{len(layout.down_layers[mirror])}, so {block} receives {needed} skip connections and needs {needed} layers"
            )
        for layer in kept:
            if not 0 <= layer < teacher_slots:
                raise InputError(
                    f"{block} keeps teacher layer {layer}, but {teacher_name} has layers 0..{teacher_slots - 1}"
                )
        if list(kept) != sorted(set(kept)):
            raise InputError(
                f"{block} keeps layers {list(kept)}: give distinct teacher layer indices in increasing order"
            )
        for slot, layer in enumerate(kept):
            student_in, student_skip, _ = _up_slot(student_channels, i, slot, len(kept))
            teacher_in, teacher_skip, _ = _up_slot(teacher_channels, teacher_block, layer, teacher_slots)
            if (student_in, student_skip) != (teacher_in, teacher_skip):
                raise InputError(
                    f"{block}: student layer {slot} would be {teacher_name} resnets.{layer}, which takes "
                    f"{teacher_in} + {teacher_skip} (skip) input channels, but that slot receives "
                    f"{student_in} + {student_skip}",
                    hint="an up block's last layer must be the teacher's last (its skip comes from the stage above)",
                )

    return StudentLayout(
        layout.name,
        layout.down_layers,
        layout.up_layers,
        layout.mid_block,
        layout.drop_stages,
        teacher_config=dict(teacher_config),
    )


def get_layout(
    name_or_spec: str | Path | Mapping[str, Any] | StudentLayout, teacher_config: Mapping[str, Any]
) -> StudentLayout:
    """The student layout for a teacher U-Net config, checked to wire up.

    Args:
        name_or_spec: a preset name (``bk-base``, ``bk-small``, ``bk-tiny``;
            aliases ``sd_small``, ``sd_tiny``, ``bk-sdm-*``), a path to a YAML/JSON spec, a
            spec mapping (see :func:`layout_from_spec`) or a StudentLayout.
        teacher_config: the teacher's ``unet.config`` (or the dict of its config.json).
    """
    check_teacher_config(teacher_config)
    if isinstance(name_or_spec, StudentLayout):
        layout = name_or_spec
    elif isinstance(name_or_spec, Mapping):
        layout = layout_from_spec(name_or_spec, teacher_config)
    else:
        text = str(name_or_spec)
        preset = normalize_preset_name(text)
        if preset is not None:
            layout = _preset_layout(preset, teacher_config)
        elif Path(text).suffix.lower() in (".json", ".yaml", ".yml") or Path(text).is_file():
            layout = layout_from_spec(load_spec_file(text), teacher_config)
        elif text.strip().lower().replace("_", "-") in UNCONFIRMED_PRESETS:
            raise InputError(
                UNCONFIRMED_PRESETS[text.strip().lower().replace("_", "-")],
                hint="use bk-base (the same shape as far as public material shows) or a custom layout spec",
            )
        else:
            raise InputError(
                f"unknown student architecture '{text}'",
                hint=f"use a preset ({', '.join(preset_names())}; aliases {', '.join(PRESET_ALIASES)}) "
                "or a YAML/JSON layout spec file",
            )
    return validate_layout(layout, teacher_config)
