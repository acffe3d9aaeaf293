"""Parameters and MACs of teachers and students, measured on meta-device models.

MACs are counted by PyTorch's own ``torch.utils.flop_counter.FlopCounterMode`` during one
U-Net forward on the meta device (shapes only: SD at 512 px is measured in about a second
without allocating memory). MACs = FLOPs / 2. They are reported in two parts:

- convs + linears: ``aten.convolution``, ``aten.mm``, ``aten.addmm``; this is what BK-SDM
  reports (measured with thop over Conv2d/Linear modules);
- attention matmuls: the ``q @ k^T`` and ``softmax @ v`` products of every self- and
  cross-attention (``aten.bmm``/``aten.baddbmm``, or the scaled-dot-product-attention kernels
  where a backend uses them), which BK-SDM leaves out.

Norms, activations, softmax and element-wise ops are not counted (they are a few GMACs at
most and not MACs in the usual sense).
"""

from __future__ import annotations

import functools
import json
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from distilsd.compress.build import student_config
from distilsd.compress.layouts import StudentLayout, get_layout
from distilsd.compress.teacher import TeacherSource, empty_unet, resolve_teacher

CONV_LINEAR_OPS = ("convolution", "_convolution", "conv2d", "mm", "addmm")
ATTENTION_OPS = (
    "bmm",
    "baddbmm",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_cudnn_attention",
    "scaled_dot_product_attention",
)

MACS_COUNTING = (
    "MACs = FLOPs/2 from torch.utils.flop_counter.FlopCounterMode over one U-Net forward on the meta device; "
    "'conv+linear' = aten.convolution, mm, addmm (what BK-SDM reports); 'attention' = the q@k^T and "
    "softmax@v matmuls of all self- and cross-attention (aten.bmm/baddbmm or SDPA kernels); "
    "norms, activations, softmax and element-wise ops are not counted"
)

TEXT_TOKENS = 77


@dataclass
class BlockStats:
    """One top-level U-Net module: its parameters and MACs, and what it is distilled against."""

    name: str
    params: int
    macs: int
    attention_macs: int
    matched_to: str | None = None


@dataclass
class ModelStats:
    """Size and cost of one U-Net (teacher or student) and of the pipeline around it."""

    name: str
    role: str  # "teacher" or "student"
    unet_params: int
    macs: int  # convs + linears
    attention_macs: int
    text_encoder_params: int | None = None
    vae_params: int | None = None
    vae_decoder_params: int | None = None
    blocks: list[BlockStats] = field(default_factory=list)
    removed_blocks: list[str] = field(default_factory=list)
    feature_pairs: list[tuple[str, str]] = field(default_factory=list)
    layout: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def total_macs(self) -> int:
        return self.macs + self.attention_macs

    @property
    def pipeline_params(self) -> int | None:
        """Text encoder + U-Net + whole VAE."""
        if self.text_encoder_params is None or self.vae_params is None:
            return None
        return self.text_encoder_params + self.unet_params + self.vae_params

    @property
    def inference_params(self) -> int | None:
        """Text encoder + U-Net + VAE decoder: what text-to-image runs (BK-SDM's 'whole model')."""
        if self.text_encoder_params is None or self.vae_decoder_params is None:
            return None
        return self.text_encoder_params + self.unet_params + self.vae_decoder_params

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("config")
        data["feature_pairs"] = [list(pair) for pair in self.feature_pairs]
        data["pipeline_params"] = self.pipeline_params
        data["inference_params"] = self.inference_params
        data["total_macs"] = self.total_macs
        return data


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _op_name(op) -> str:
    # OpOverloadPacket str is e.g. "aten.convolution"; an OpOverload is "aten.convolution.default".
    return str(op).split(".")[1] if str(op).startswith("aten.") else str(op)


def measure_macs(unet, height: int, width: int, batch_size: int = 1, vae_scale_factor: int = 8):
    """MACs of one forward of ``unet`` (a U-Net or its config; built on the meta device).

    Returns (conv+linear total, attention total, per top-level module), where the per-module
    dict maps ``conv_in``, ``down_blocks.0``, ... (forward order) to (conv+linear, attention).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if isinstance(unet, Mapping):
        unet = empty_unet(dict(unet))
    unet_config = unet.config
    cross_attention_dim = unet_config.get("cross_attention_dim", 1280)
    if isinstance(cross_attention_dim, (list, tuple)):
        cross_attention_dim = cross_attention_dim[0]
    in_channels = unet_config.get("in_channels", 4)
    sample = torch.zeros(
        batch_size, in_channels, height // vae_scale_factor, width // vae_scale_factor, device="meta"
    )
    timestep = torch.zeros(batch_size, device="meta")
    text = torch.zeros(batch_size, TEXT_TOKENS, cross_attention_dim, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(sample, timestep, text)

    def split(op_counts: Mapping[Any, int]) -> tuple[int, int]:
        conv_linear = sum(n for op, n in op_counts.items() if _op_name(op) in CONV_LINEAR_OPS)
        attention = sum(n for op, n in op_counts.items() if _op_name(op) in ATTENTION_OPS)
        return conv_linear // 2, attention // 2

    counts = counter.get_flop_counts()
    root = type(unet).__name__
    total = split(counts.get("Global", {}))
    per_module: dict[str, tuple[int, int]] = {}
    for name in _top_level_names(unet):
        per_module[name] = split(counts.get(f"{root}.{name}", {}))
    return total[0], total[1], per_module


@functools.lru_cache(maxsize=32)
def _cached_macs(config_json: str, height: int, width: int, batch_size: int, vae_scale_factor: int):
    # Measuring walks ~1,500 ops through Python meta kernels (about a second for SD): reports
    # that show the same U-Net twice (a teacher in several reports) measure it once.
    return measure_macs(json.loads(config_json), height, width, batch_size, vae_scale_factor)


def _top_level_names(unet) -> list[str]:
    """Top-level modules in forward order, with down/up blocks listed one by one."""
    children = dict(unet.named_children())
    # named_children() lists mid_block after up_blocks (construction order); show forward order.
    order = [name for name in children if name != "mid_block"]
    if "mid_block" in children:
        order.insert(order.index("up_blocks") if "up_blocks" in order else len(order), "mid_block")
    names = []
    for name in order:
        if name in ("down_blocks", "up_blocks"):
            names.extend(f"{name}.{i}" for i in range(len(children[name])))
        elif children[name] is not None:
            names.append(name)
    return names


def component_parameters(
    component_configs: Mapping[str, Mapping[str, Any]],
) -> tuple[int | None, int | None, int | None]:
    """Parameters of the text encoder, the VAE and the VAE decoder (None where unknown).

    Built from their configs on the meta device, so nothing is loaded or allocated.
    """
    import torch

    text_encoder_params = vae_params = decoder_params = None
    text_config = component_configs.get("text_encoder")
    # SD 1.x/2.x text encoders are CLIP text models; others are left uncounted rather than guessed.
    if text_config is not None and text_config.get("model_type", "clip_text_model") == "clip_text_model":
        from transformers import CLIPTextConfig, CLIPTextModel

        config = CLIPTextConfig(
            **{
                k: v
                for k, v in text_config.items()
                if k not in ("architectures", "model_type", "torch_dtype", "dtype")
            }
        )
        with torch.device("meta"):
            text_encoder_params = count_parameters(CLIPTextModel(config))
    vae_config = component_configs.get("vae")
    if vae_config is not None:
        from diffusers import AutoencoderKL

        with torch.device("meta"):
            vae = AutoencoderKL.from_config(dict(vae_config))
        vae_params = count_parameters(vae)
        decoder_params = count_parameters(vae.decoder)
    return text_encoder_params, vae_params, decoder_params


def _vae_scale_factor(component_configs: Mapping[str, Mapping[str, Any]]) -> int:
    vae_config = component_configs.get("vae")
    if vae_config and "block_out_channels" in vae_config:
        return 2 ** (len(vae_config["block_out_channels"]) - 1)
    return 8


def model_stats(
    name: str,
    role: str,
    unet_config: Mapping[str, Any],
    resolution: tuple[int, int],
    batch_size: int = 1,
    component_params: tuple[int | None, int | None, int | None] = (None, None, None),
    layout: StudentLayout | None = None,
    vae_scale_factor: int = 8,
) -> ModelStats:
    """Parameters (U-Net, per block) and MACs of one U-Net config.

    ``component_params`` are (text encoder, VAE, VAE decoder) parameters, shared by a teacher
    and its students (see :func:`component_parameters`).
    """
    unet = empty_unet(dict(unet_config))
    height, width = resolution
    config_key = json.dumps(dict(unet.config), sort_keys=True, default=str)
    macs, attention_macs, per_module = _cached_macs(config_key, height, width, batch_size, vae_scale_factor)
    # student module -> teacher module it is distilled against
    matched = {student: teacher for teacher, student in layout.feature_pairs} if layout else {}
    blocks = []
    for block_name, (block_macs, block_attention) in per_module.items():
        params = count_parameters(unet.get_submodule(block_name))
        if params == 0 and block_macs == 0 and block_attention == 0:
            continue  # time_proj, conv_act: nothing to show
        matched_to = None
        for student_module, teacher_module in matched.items():
            if student_module == block_name:
                matched_to = teacher_module
            elif student_module.startswith(block_name + "."):
                matched_to = f"{teacher_module} (at {student_module[len(block_name) + 1 :]})"
        blocks.append(BlockStats(block_name, params, block_macs, block_attention, matched_to))
    text_encoder_params, vae_params, decoder_params = component_params
    return ModelStats(
        name=name,
        role=role,
        unet_params=count_parameters(unet),
        macs=macs,
        attention_macs=attention_macs,
        text_encoder_params=text_encoder_params,
        vae_params=vae_params,
        vae_decoder_params=decoder_params,
        blocks=blocks,
        removed_blocks=layout.removed_modules if layout else [],
        feature_pairs=list(layout.feature_pairs) if layout else [],
        layout=layout.to_dict() if layout else None,
        config=dict(unet_config),
    )


DEFAULT_ARCHS = ("bk-base", "bk-small", "bk-tiny")


def _giga(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}G"


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _table(
    header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "", text_columns: int = 1
) -> list[str]:
    """Aligned columns: text (the first ``text_columns`` and the last if text) left, numbers right."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = []
        for i, (cell, width) in enumerate(zip(row, widths, strict=True)):
            left = i < text_columns or (i == len(row) - 1 and header[-1].startswith("distilled"))
            cells.append(str(cell).ljust(width) if left else str(cell).rjust(width))
        return (indent + "  ".join(cells)).rstrip()

    return [line(header), *(line(row) for row in rows)]


def _wrapped(prefix: str, names: Sequence[str], width: int = 100) -> list[str]:
    """``prefix`` followed by comma-separated names, wrapped under the first name."""
    text = ", ".join(names) if names else "nothing"
    return textwrap.wrap(
        text, width=width, initial_indent=prefix, subsequent_indent=" " * len(prefix), break_on_hyphens=False
    )


@dataclass
class ArchitectureReport:
    """What ``distilsd arch`` shows: the teacher and its students, measured the same way."""

    teacher: TeacherSource
    resolution: tuple[int, int]
    batch_size: int
    models: list[ModelStats]

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher.to_dict(),
            "resolution": list(self.resolution),
            "batch_size": self.batch_size,
            "macs_counting": MACS_COUNTING,
            "models": [model.to_dict() for model in self.models],
        }

    def format_table(self) -> str:
        height, width = self.resolution
        teacher = self.models[0]
        lines = [
            f"teacher: {self.teacher.name} ({self.teacher.description})",
            f"MACs per U-Net forward at {width}x{height} px, batch {self.batch_size}",
            "",
        ]
        rows = []
        for model in self.models:
            rows.append(
                [
                    model.name,
                    _count(model.unet_params),
                    f"{100 * model.unet_params / teacher.unet_params:.1f}%",
                    _count(model.inference_params),
                    _count(model.pipeline_params),
                    _giga(model.macs),
                    _giga(model.attention_macs),
                    _giga(model.total_macs),
                ]
            )
        lines += _table(
            [
                "model",
                "U-Net params",
                "vs teacher",
                "TE+U-Net+VAE dec",
                "TE+U-Net+VAE",
                "MACs conv+lin",
                "MACs attn",
                "MACs total",
            ],
            rows,
        )
        for model in self.models:
            lines += ["", f"== {model.name} ({model.role}) =="]
            is_student = model.role == "student"
            header = ["block", "params", "MACs conv+lin", "MACs attn"] + (
                ["distilled against (teacher)"] if is_student else []
            )
            block_rows = []
            for block in model.blocks:
                row = [block.name, _count(block.params), _giga(block.macs), _giga(block.attention_macs)]
                if is_student:
                    row.append(block.matched_to or "-")
                block_rows.append(row)
            total = ["total", _count(model.unet_params), _giga(model.macs), _giga(model.attention_macs)]
            block_rows.append(total + ([""] if is_student else []))
            lines += _table(header, block_rows, indent="  ")
            if is_student:
                lines += _wrapped("  removed from the teacher: ", model.removed_blocks)
        lines += [
            "",
            "TE+U-Net+VAE dec: text encoder + U-Net + VAE decoder (what text-to-image runs; BK-SDM's 'whole model').",
        ]
        lines += textwrap.wrap(
            f"MACs: {MACS_COUNTING}.", width=100, subsequent_indent="  ", break_on_hyphens=False
        )
        return "\n".join(lines)


def describe_architecture(
    teacher: str | TeacherSource = "sd-v1",
    archs: Sequence[str | Mapping[str, Any] | StudentLayout] = DEFAULT_ARCHS,
    resolution: int | tuple[int, int] | None = None,
    batch_size: int = 1,
) -> ArchitectureReport:
    """Parameters, MACs, per-block breakdown, removed blocks and distillation pairs.

    Args:
        teacher: ``"sd-v1"``, ``"sd-v2"`` (shipped configs), a pipeline or U-Net folder, a
            hub id, or a resolved :class:`TeacherSource`. Only configs are read.
        archs: student presets or layout specs to compare with the teacher.
        resolution: image size in pixels (an int for square); default: the teacher's native
            size (``sample_size`` x VAE scale factor).
        batch_size: batch of the measured forward.

    Returns:
        An :class:`ArchitectureReport` (teacher first in ``models``); ``.to_dict()`` is
        JSON-ready, ``.format_table()`` is the text ``distilsd arch`` prints.
    """
    from distilsd.errors import InputError

    source = teacher if isinstance(teacher, TeacherSource) else resolve_teacher(teacher)
    layouts = [get_layout(arch, source.unet_config) for arch in archs]  # all checked before measuring
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    scale = _vae_scale_factor(source.component_configs)
    if resolution is None:
        sample_size = source.unet_config.get("sample_size") or 64
        size = sample_size if isinstance(sample_size, (list, tuple)) else (sample_size, sample_size)
        resolution = (int(size[0]) * scale, int(size[1]) * scale)
    elif isinstance(resolution, int):
        resolution = (resolution, resolution)
    if any(side <= 0 or side % scale for side in resolution):
        raise InputError(f"resolution {resolution[0]}x{resolution[1]} must be a positive multiple of {scale}")

    components = component_parameters(source.component_configs)
    stats = [
        model_stats(
            source.name, "teacher", source.unet_config, resolution, batch_size, components, None, scale
        )
    ]
    for layout in layouts:
        config = student_config(source.unet_config, layout)
        stats.append(
            model_stats(layout.name, "student", config, resolution, batch_size, components, layout, scale)
        )
    return ArchitectureReport(source, resolution, batch_size, stats)
