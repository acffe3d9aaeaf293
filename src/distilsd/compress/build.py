"""Build a student U-Net from a teacher: edit the teacher's config, then copy tensors by name.

The student is a stock diffusers ``UNet2DConditionModel`` whose constructor arguments (and
so its saved config.json) describe its modules exactly; it reloads with ``from_pretrained``.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from distilsd.compress.layouts import StudentLayout, get_layout
from distilsd.errors import InputError

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

INIT_MODES = ("teacher", "random")

# Config entries that may be given per down block (a list, outermost stage first).
PER_DOWN_BLOCK_KEYS = (
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "only_cross_attention",
    "transformer_layers_per_block",
)


def student_config(teacher_config: Mapping[str, Any], layout: StudentLayout) -> dict[str, Any]:
    """The student's U-Net config: the teacher's, edited to the layout.

    Only the entries that change are touched: ``layers_per_block`` (BK-SDM students have 1,
    so diffusers builds 1 layer per down block and 2 per up block), ``mid_block_type``
    (None without a mid block) and, when stages are dropped, the per-stage lists.
    """
    config = {key: copy.deepcopy(value) for key, value in teacher_config.items() if not key.startswith("_")}
    num_stages = layout.num_stages
    drop = layout.drop_stages

    if drop:
        config["block_out_channels"] = list(config["block_out_channels"])[:num_stages]
        config["down_block_types"] = list(config["down_block_types"])[:num_stages]
        # Up blocks are listed innermost first: the dropped stages are the first ones.
        config["up_block_types"] = list(config["up_block_types"])[drop:]
        for key in PER_DOWN_BLOCK_KEYS:
            if isinstance(config.get(key), (list, tuple)):
                config[key] = list(config[key])[:num_stages]
        if isinstance(config.get("reverse_transformer_layers_per_block"), (list, tuple)):
            config["reverse_transformer_layers_per_block"] = list(
                config["reverse_transformer_layers_per_block"]
            )[drop:]

    # Per-layer transformer depths (a list per block) follow the kept layers.
    depths = config.get("transformer_layers_per_block")
    if isinstance(depths, list) and any(isinstance(d, (list, tuple)) for d in depths):
        config["transformer_layers_per_block"] = [
            [d[j] for j in kept] if isinstance(d, (list, tuple)) else d
            for d, kept in zip(depths, layout.down_layers, strict=True)
        ]
    reverse_depths = config.get("reverse_transformer_layers_per_block")
    if isinstance(reverse_depths, list):
        config["reverse_transformer_layers_per_block"] = [
            [d[j] for j in kept] if isinstance(d, (list, tuple)) else d
            for d, kept in zip(reverse_depths, layout.up_layers, strict=True)
        ]

    counts = [len(kept) for kept in layout.down_layers]
    config["layers_per_block"] = counts[0] if len(set(counts)) == 1 else counts
    if not layout.mid_block:
        config["mid_block_type"] = None
    return config


def teacher_tensor_name(student_name: str, layout: StudentLayout) -> str:
    """The teacher tensor a student tensor is initialised from (BK-SDM mapping).

    Down blocks keep the listed teacher layers; up block i is teacher up block
    i + drop_stages (BK-SDM-Tiny's shift) with its listed layers; everything else
    (conv_in, time embedding, mid block, conv_out, up/down samplers) keeps its name.
    """
    parts = student_name.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 3:
        block = int(parts[1])
        if parts[0] == "up_blocks":
            kept = layout.up_layers[block]
            parts[1] = str(layout.teacher_up_block(block))
        else:
            kept = layout.down_layers[block]
        if parts[2] in ("resnets", "attentions"):
            parts[3] = str(kept[int(parts[3])])
    return ".".join(parts)


def _empty_unet(config: Mapping[str, Any]) -> UNet2DConditionModel:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config))


def tensor_mapping(teacher_config: Mapping[str, Any], layout: StudentLayout) -> dict[str, str]:
    """Student tensor name -> teacher tensor name for every student tensor (no weights needed).

    Both models are built on the meta device to read names and shapes; a student tensor
    without a teacher tensor of the same shape is refused, naming the block.
    """
    teacher_shapes = _meta_shapes(json.dumps(dict(teacher_config), sort_keys=True, default=str))
    student_shapes = _meta_shapes(
        json.dumps(student_config(teacher_config, layout), sort_keys=True, default=str)
    )
    return _checked_mapping(student_shapes, teacher_shapes, layout)


@functools.lru_cache(maxsize=16)
def _meta_shapes(config_json: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a U-Net config (cached: an SD-size build takes a fraction of a second)."""
    return {name: tuple(t.shape) for name, t in _empty_unet(json.loads(config_json)).state_dict().items()}


def _checked_mapping(
    student_shapes: Mapping[str, tuple[int, ...]],
    teacher_shapes: Mapping[str, tuple[int, ...]],
    layout: StudentLayout,
) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for name, shape in student_shapes.items():
        teacher_name = teacher_tensor_name(name, layout)
        if teacher_name not in teacher_shapes:
            raise InputError(
                f"{name}: the teacher has no tensor {teacher_name} to initialise it from",
                hint="use --init random",
            )
        if teacher_shapes[teacher_name] != shape:
            raise InputError(
                f"{name}: shape {list(shape)} does not match teacher {teacher_name} {list(teacher_shapes[teacher_name])}",
                hint="use --init random, or keep teacher layers whose channels fit",
            )
        mapping[name] = teacher_name
    return mapping


def build_student(
    teacher_unet: UNet2DConditionModel,
    layout: StudentLayout | str | Mapping[str, Any],
    init: str = "teacher",
) -> tuple[UNet2DConditionModel, dict[str, str]]:
    """Build a student U-Net from ``teacher_unet``.

    Args:
        teacher_unet: a diffusers UNet2DConditionModel (its weights are read, never changed).
        layout: a StudentLayout from :func:`get_layout`, or a preset name / spec for it.
        init: ``"teacher"`` copies the mapped teacher tensors (BK-SDM), ``"random"`` keeps
            diffusers' default initialisation.

    Returns:
        ``(student_unet, mapping)``: the student (same dtype and device as the teacher, its
        own storage) and the mapping student tensor name -> teacher tensor name that was
        copied (empty for ``init="random"``).
    """
    from diffusers import UNet2DConditionModel

    if not isinstance(teacher_unet, UNet2DConditionModel):
        raise InputError(
            f"the teacher is a {type(teacher_unet).__name__}, not a diffusers UNet2DConditionModel",
            hint="give an SD 1.x/2.x U-Net",
        )
    if init not in INIT_MODES:
        raise InputError(f"unknown init '{init}'", hint=f"use one of: {', '.join(INIT_MODES)}")
    if not isinstance(layout, StudentLayout) or layout.teacher_config != dict(teacher_unet.config):
        layout = get_layout(layout, teacher_unet.config)

    config = student_config(teacher_unet.config, layout)
    parameter = next(teacher_unet.parameters())
    if init == "random":
        student = UNet2DConditionModel.from_config(config)
        return student.to(device=parameter.device, dtype=parameter.dtype), {}

    teacher_state = teacher_unet.state_dict()
    student = _empty_unet(config)
    student_shapes = {name: tuple(t.shape) for name, t in student.state_dict().items()}
    mapping = _checked_mapping(
        student_shapes, {name: tuple(t.shape) for name, t in teacher_state.items()}, layout
    )
    # Clone so that training the student never writes into the teacher.
    student_state = {
        name: teacher_state[teacher_name].detach().clone() for name, teacher_name in mapping.items()
    }
    student.load_state_dict(student_state, strict=True, assign=True)
    student.train(teacher_unet.training)
    return student, mapping
