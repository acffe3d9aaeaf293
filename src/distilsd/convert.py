"""Convert a diffusers Stable Diffusion 1.x/2.x pipeline folder into one original-layout checkpoint.

The output is the single ``.safetensors`` file that the CompVis/Stability code base, AUTOMATIC1111,
ComfyUI and ``StableDiffusionPipeline.from_single_file`` read:

* ``model.diffusion_model.*``      the U-Net (LDM ``input_blocks`` / ``middle_block`` / ``output_blocks``)
* ``first_stage_model.*``          the VAE (``encoder.down.N.block.M`` ..., 1x1-conv mid-block attention)
* ``cond_stage_model.transformer.*``  an SD 1.x (OpenAI CLIP) text encoder, kept in transformers naming
* ``cond_stage_model.model.*``     an SD 2.x (OpenCLIP) text encoder, with fused ``in_proj`` q/k/v

Every mapping here is the exact inverse of diffusers' own single-file loader
(``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``).
Block and layer counts come from each model's config, so pruned students (BK-SDM without a mid
block, one resnet per stage, fewer stages) convert too. Any weight the layout has no place for is
an error rather than silently dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distilsd.errors import InputError, ModelLoadError, OutputError

if TYPE_CHECKING:
    import torch

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."
LDM_OPEN_CLIP_PREFIX = "cond_stage_model.model."

# U-Net block types whose LDM numbering diffusers' loader knows how to read back.
_DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers ResnetBlock2D sub-module -> LDM ResBlock sub-module (U-Net).
_UNET_RESNET_RENAMES = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
)
# diffusers ResnetBlock2D -> LDM ResnetBlock (VAE): only the shortcut is named differently.
_VAE_RESNET_RENAMES = (
    ("norm1.", "norm1."),
    ("conv1.", "conv1."),
    ("norm2.", "norm2."),
    ("conv2.", "conv2."),
    ("conv_shortcut.", "nin_shortcut."),
)
# diffusers Attention (VAE mid block) -> LDM AttnBlock.
_VAE_ATTENTION_RENAMES = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)
# CLIP encoder layer -> OpenCLIP residual block (q/k/v are fused separately).
_OPEN_CLIP_LAYER_RENAMES = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)

Renamer = Callable[[str, "torch.Tensor"], tuple[str, "torch.Tensor"]]


# --------------------------------------------------------------------------------------------
# Generic prefix remapping
# --------------------------------------------------------------------------------------------


def _keep(local: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    return local, tensor


def _renamer(renames: tuple[tuple[str, str], ...], conv_weights: tuple[str, ...] = ()) -> Renamer:
    """A renamer for one module kind; ``conv_weights`` are linear weights stored as 1x1 convs in LDM."""

    def rename(local: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        for old, new in renames:
            if local.startswith(old):
                if old in conv_weights and local.endswith("weight") and tensor.ndim == 2:
                    tensor = tensor[:, :, None, None]
                return new + local[len(old) :], tensor
        raise KeyError(local)

    return rename


def _remap(
    state_dict: Mapping[str, torch.Tensor], modules: dict[str, tuple[str, Renamer]], what: str
) -> dict[str, torch.Tensor]:
    """Move every tensor from its diffusers module prefix to its LDM one; fail on leftovers."""
    # Longest prefix first, so that a nested module always wins over the module around it.
    ordered = sorted(modules.items(), key=lambda item: len(item[0]), reverse=True)

    def convert(key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        for prefix, (ldm_prefix, rename) in ordered:
            if key.startswith(prefix):
                try:
                    local, tensor = rename(key[len(prefix) :], tensor)
                except KeyError:
                    return None
                return ldm_prefix + local, tensor
        return None

    converted: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        result = convert(key, tensor)
        if result is None:
            unmapped.append(key)
        elif result[0] in converted:
            raise InputError(f"the {what} has two weights that both map to {result[0]}")
        else:
            converted[result[0]] = result[1]
    if unmapped:
        shown = ", ".join(sorted(unmapped)[:5]) + (" ..." if len(unmapped) > 5 else "")
        raise InputError(
            f"the {what} has {len(unmapped)} weight(s) with no place in the SD 1.x/2.x checkpoint layout: {shown}",
            hint="only SD 1.x/2.x-topology models (including BK-SDM-style pruned students) can be converted",
        )
    return converted


# --------------------------------------------------------------------------------------------
# Per-model conversions
# --------------------------------------------------------------------------------------------


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Diffusers ``UNet2DConditionModel`` weights -> LDM ``UNetModel`` keys (without the ``model.diffusion_model.`` prefix)."""
    layers_per_block = config.get("layers_per_block", 2)
    if not isinstance(layers_per_block, int):
        # The LDM numbering (and diffusers' reader of it) assumes one count for every stage.
        raise InputError(
            f"the U-Net has a per-stage layers_per_block {layers_per_block}, which the LDM layout cannot express",
            hint="only U-Nets with one integer layers_per_block can be converted",
        )
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    unsupported = [t for t in down_types if t not in _DOWN_BLOCK_TYPES]
    unsupported += [t for t in up_types if t not in _UP_BLOCK_TYPES]
    unsupported += [] if mid_type in _MID_BLOCK_TYPES else [mid_type]
    if unsupported:
        raise InputError(
            f"the U-Net uses block types the SD 1.x/2.x layout has no form for: {', '.join(map(str, unsupported))}",
            hint="only SD 1.x/2.x-topology U-Nets (including BK-SDM-style pruned students) can be converted",
        )

    resnet = _renamer(_UNET_RESNET_RENAMES)
    modules: dict[str, tuple[str, Renamer]] = {
        "time_embedding.linear_1.": ("time_embed.0.", _keep),
        "time_embedding.linear_2.": ("time_embed.2.", _keep),
        "conv_in.": ("input_blocks.0.0.", _keep),
        "conv_norm_out.": ("out.0.", _keep),
        "conv_out.": ("out.2.", _keep),
    }
    # Class / additional embeddings (e.g. the x4 upscaler) share LDM's `label_emb`.
    if config.get("class_embed_type") in ("timestep", "projection"):
        modules["class_embedding.linear_1."] = ("label_emb.0.0.", _keep)
        modules["class_embedding.linear_2."] = ("label_emb.0.2.", _keep)
    elif config.get("num_class_embeds") is not None:
        modules["class_embedding."] = ("label_emb.", _keep)
    if config.get("addition_embed_type") == "text_time":
        modules["add_embedding.linear_1."] = ("label_emb.0.0.", _keep)
        modules["add_embedding.linear_2."] = ("label_emb.0.2.", _keep)

    # LDM numbers input blocks 1, 2, ... with `layers_per_block` resnets (+attention) per stage,
    # followed by one downsampler for every stage but the last.
    stride = layers_per_block + 1
    for block, block_type in enumerate(down_types):
        for layer in range(layers_per_block):
            index = 1 + block * stride + layer
            modules[f"down_blocks.{block}.resnets.{layer}."] = (f"input_blocks.{index}.0.", resnet)
            if block_type.startswith("CrossAttn"):
                modules[f"down_blocks.{block}.attentions.{layer}."] = (f"input_blocks.{index}.1.", _keep)
        index = 1 + block * stride + layers_per_block
        modules[f"down_blocks.{block}.downsamplers.0.conv."] = (f"input_blocks.{index}.0.op.", _keep)

    # middle_block is [resnet, attention, resnet]; BK-SDM students may have no mid block at all.
    if mid_type is not None:
        modules["mid_block.resnets.0."] = ("middle_block.0.", resnet)
        modules["mid_block.attentions.0."] = ("middle_block.1.", _keep)
        modules["mid_block.resnets.1."] = ("middle_block.2.", resnet)

    # Up stages have one layer more than down stages; the upsampler sits in the stage's last
    # output block, after the attention when there is one.
    for block, block_type in enumerate(up_types):
        has_attention = block_type.startswith("CrossAttn")
        for layer in range(stride):
            index = block * stride + layer
            modules[f"up_blocks.{block}.resnets.{layer}."] = (f"output_blocks.{index}.0.", resnet)
            if has_attention:
                modules[f"up_blocks.{block}.attentions.{layer}."] = (f"output_blocks.{index}.1.", _keep)
        index = block * stride + layers_per_block
        slot = 2 if has_attention else 1
        modules[f"up_blocks.{block}.upsamplers.0.conv."] = (f"output_blocks.{index}.{slot}.conv.", _keep)

    return _remap(state_dict, modules, "U-Net")


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKL`` weights -> LDM ``AutoencoderKL`` keys (without the ``first_stage_model.`` prefix)."""
    layers_per_block = config.get("layers_per_block", 1)
    num_down = len(config["down_block_types"])
    num_up = len(config["up_block_types"])

    resnet = _renamer(_VAE_RESNET_RENAMES)
    # LDM stores the mid-block attention projections as 1x1 convolutions.
    attention = _renamer(_VAE_ATTENTION_RENAMES, conv_weights=("to_q.", "to_k.", "to_v.", "to_out.0."))
    modules: dict[str, tuple[str, Renamer]] = {
        "quant_conv.": ("quant_conv.", _keep),
        "post_quant_conv.": ("post_quant_conv.", _keep),
    }
    for part in ("encoder", "decoder"):
        modules[f"{part}.conv_in."] = (f"{part}.conv_in.", _keep)
        modules[f"{part}.conv_out."] = (f"{part}.conv_out.", _keep)
        modules[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", _keep)
        modules[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", resnet)
        modules[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", resnet)
        modules[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", attention)

    for block in range(num_down):
        for layer in range(layers_per_block):
            modules[f"encoder.down_blocks.{block}.resnets.{layer}."] = (
                f"encoder.down.{block}.block.{layer}.",
                resnet,
            )
        modules[f"encoder.down_blocks.{block}.downsamplers.0.conv."] = (
            f"encoder.down.{block}.downsample.conv.",
            _keep,
        )

    # LDM indexes decoder levels by resolution (up.0 is full resolution and runs last);
    # diffusers numbers up_blocks in the order they run.
    for block in range(num_up):
        level = num_up - 1 - block
        for layer in range(layers_per_block + 1):
            modules[f"decoder.up_blocks.{block}.resnets.{layer}."] = (
                f"decoder.up.{level}.block.{layer}.",
                resnet,
            )
        modules[f"decoder.up_blocks.{block}.upsamplers.0.conv."] = (
            f"decoder.up.{level}.upsample.conv.",
            _keep,
        )

    return _remap(state_dict, modules, "VAE")


def _text_model_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-encoder weights keyed without the ``text_model.`` wrapper and without the position_ids buffer.

    transformers >= 5.6 flattened ``CLIPTextModel`` (no ``text_model.`` level); older versions and
    ``CLIPTextModelWithProjection`` keep it. Normalising here makes both work.
    """
    flat = {key.removeprefix("text_model."): tensor for key, tensor in state_dict.items()}
    flat.pop("embeddings.position_ids", None)  # a buffer, not a weight; loaders rebuild it
    return flat


def clip_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x CLIP text encoder -> keys below ``cond_stage_model.transformer.`` (transformers naming)."""
    flat = _text_model_keys(state_dict)
    if "text_projection.weight" in flat:
        raise InputError(
            "the text encoder has a text projection, which the SD 1.x checkpoint layout has no place for",
            hint="SD 1.x uses a plain CLIPTextModel",
        )
    return {f"text_model.{key}": tensor for key, tensor in flat.items()}


def open_clip_to_ldm(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """SD 2.x text encoder (CLIP naming in diffusers) -> OpenCLIP keys below ``cond_stage_model.model.``.

    Diffusers' SD 2.x text encoder has one layer fewer than the original OpenCLIP ViT-H (SD 2.x
    reads the penultimate layer, so the last one was dropped), and no text projection; the output
    therefore has ``config["num_hidden_layers"]`` resblocks and no ``text_projection`` unless the
    model has one.
    """
    import torch

    flat = _text_model_keys(state_dict)
    converted: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in flat:
            raise InputError(
                f"the text encoder has no {key} weight, which the OpenCLIP layout needs",
                hint="SD 2.x uses a CLIPTextModel converted from OpenCLIP ViT-H",
            )
        return flat.pop(key)

    converted["token_embedding.weight"] = take("embeddings.token_embedding.weight")
    converted["positional_embedding"] = take("embeddings.position_embedding.weight")
    converted["ln_final.weight"] = take("final_layer_norm.weight")
    converted["ln_final.bias"] = take("final_layer_norm.bias")
    if "text_projection.weight" in flat:
        # OpenCLIP applies `x @ text_projection`, a Linear applies `x @ W.T`.
        converted["text_projection"] = take("text_projection.weight").T.contiguous()

    renames = _renamer(_OPEN_CLIP_LAYER_RENAMES)
    for layer in range(config["num_hidden_layers"]):
        src = f"encoder.layers.{layer}."
        dst = f"transformer.resblocks.{layer}."
        # nn.MultiheadAttention keeps q, k and v in one [3 * width, width] projection, in that order.
        for kind in ("weight", "bias"):
            parts = [take(f"{src}self_attn.{name}_proj.{kind}") for name in ("q", "k", "v")]
            converted[f"{dst}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
        for key in [k for k in flat if k.startswith(src)]:
            try:
                local, tensor = renames(key[len(src) :], flat[key])
            except KeyError:
                continue  # left in `flat`, reported below with any other leftovers
            del flat[key]
            converted[dst + local] = tensor

    if flat:
        shown = ", ".join(sorted(flat)[:5]) + (" ..." if len(flat) > 5 else "")
        raise InputError(
            f"the text encoder has {len(flat)} weight(s) with no place in the OpenCLIP layout: {shown}",
            hint="SD 2.x uses a CLIPTextModel converted from OpenCLIP ViT-H",
        )
    return converted


# --------------------------------------------------------------------------------------------
# Pipeline folder -> single file
# --------------------------------------------------------------------------------------------


def _torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    import torch

    from distilsd.models import torch_dtype

    if name is None or isinstance(name, torch.dtype):
        return name
    return torch_dtype(name)


def _stored_dtype(folder: Path) -> torch.dtype:
    """The dtype a component's weights are stored in (float32 when it cannot be told)."""
    import torch
    from safetensors import safe_open

    # Prefer the main (or first shard) file over variants such as `model.fp16.safetensors`.
    files = sorted(folder.glob("*.safetensors"), key=lambda p: (p.name.count(".") != 1, p.name))
    for file in files[:1]:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                dtype = handle.get_slice(key).get_dtype()
                if dtype in ("F16", "BF16", "F32"):
                    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[dtype]
    return torch.float32


def _read_pipeline_index(pipeline_dir: Path) -> dict[str, Any]:
    if not pipeline_dir.exists():
        raise InputError(f"{pipeline_dir} does not exist", hint="pass a diffusers pipeline folder")
    if not pipeline_dir.is_dir():
        raise InputError(
            f"{pipeline_dir} is not a folder", hint="pass a diffusers pipeline folder, not a file"
        )
    index_file = pipeline_dir / "model_index.json"
    if not index_file.is_file():
        raise InputError(
            f"{pipeline_dir} is not a diffusers pipeline folder (no model_index.json)",
            hint="pass the folder written by save_pretrained(), with model_index.json, unet/, vae/ and text_encoder/",
        )
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{index_file} is not valid JSON: {exc}") from exc
    missing = [
        name
        for name in ("unet", "vae", "text_encoder")
        if not (
            isinstance(index.get(name), list)
            and index[name][0] is not None
            and (pipeline_dir / name).is_dir()
        )
    ]
    if missing:
        raise InputError(
            f"{pipeline_dir} has no {', '.join(missing)} (an SD 1.x/2.x pipeline folder has unet/, vae/ and text_encoder/)",
            hint="pass a Stable Diffusion 1.x/2.x pipeline folder written by save_pretrained()",
        )
    return index


def _check_output(output_path: Path, overwrite: bool) -> None:
    if output_path.suffix.lower() != ".safetensors":
        raise InputError(
            f"the output must be a .safetensors file, got {output_path.name}",
            hint="name the output like model.safetensors",
        )
    if output_path.is_dir():
        raise OutputError(f"{output_path} is a folder", hint="give a file path ending in .safetensors")
    if output_path.exists() and not overwrite:
        raise OutputError(
            f"{output_path} already exists",
            hint="choose another path, or pass --overwrite (overwrite=True) to replace it",
        )


def _load_components(pipeline_dir: Path, torch_dtype: torch.dtype | None) -> tuple[Any, Any, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors import SafetensorError
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    def dtype_of(name: str) -> torch.dtype:
        return torch_dtype or _stored_dtype(pipeline_dir / name)

    from distilsd.models import load_component

    folder = str(pipeline_dir)
    try:
        # The one loading path (models.load_component): safetensors only, a pickle-only part
        # refused as everywhere else (convert has no --allow-pickle: it writes safetensors).
        unet = load_component(UNet2DConditionModel, folder, "unet", what="U-Net", torch_dtype=dtype_of("unet"))
        vae = load_component(AutoencoderKL, folder, "vae", what="VAE", torch_dtype=dtype_of("vae"))
        te_config = json.loads((pipeline_dir / "text_encoder" / "config.json").read_text())
        te_class = (
            CLIPTextModelWithProjection
            if "CLIPTextModelWithProjection" in te_config.get("architectures", [])
            else CLIPTextModel
        )
        text_encoder = load_component(te_class, folder, "text_encoder", what="text encoder")
        text_encoder.to(dtype_of("text_encoder"))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ModelLoadError(
            f"could not load the models of {pipeline_dir}: {str(exc).splitlines()[0]}",
            hint="the folder must hold .safetensors weights of an SD 1.x/2.x pipeline",
        ) from exc
    return unet, vae, text_encoder


def _save_atomically(tensors: dict[str, torch.Tensor], output_path: Path) -> None:
    from safetensors.torch import save_file

    output_path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so os.replace is an atomic rename: readers never see a half-written file.
    tmp_path = output_path.with_name(f".{output_path.name}.{os.getpid()}.tmp")
    try:
        # safetensors writes 0600 files; a checkpoint is meant to be shared, so give it the mode
        # any new file gets here (0666 less the umask), learnt by creating the temp file first.
        fd = os.open(tmp_path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o666)
        mode = os.fstat(fd).st_mode & 0o777
        os.close(fd)
        save_file(tensors, str(tmp_path), metadata={"format": "pt"})
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, output_path)
    finally:
        tmp_path.unlink(missing_ok=True)


def pipeline_to_ldm(
    unet: Any, vae: Any, text_encoder: Any, sd_version: int | None = None
) -> dict[str, torch.Tensor]:
    """Loaded pipeline models -> one LDM-layout state dict (all prefixes included).

    ``sd_version`` picks the text-encoder layout (1: OpenAI CLIP, 2: OpenCLIP); by default it
    is 2 when the U-Net uses linear transformer projections, which SD 2.x does and SD 1.x does not.
    """
    if sd_version is None:
        sd_version = 2 if unet.config.get("use_linear_projection", False) else 1
    if sd_version not in (1, 2):
        raise InputError(f"unknown sd_version {sd_version!r}", hint="use 1 or 2")
    checkpoint: dict[str, torch.Tensor] = {}
    for key, tensor in unet_to_ldm(unet.state_dict(), unet.config).items():
        checkpoint[LDM_UNET_PREFIX + key] = tensor
    for key, tensor in vae_to_ldm(vae.state_dict(), vae.config).items():
        checkpoint[LDM_VAE_PREFIX + key] = tensor
    if sd_version == 1:
        for key, tensor in clip_to_ldm(text_encoder.state_dict()).items():
            checkpoint[LDM_CLIP_PREFIX + key] = tensor
    else:
        te_config = text_encoder.config.to_dict()
        for key, tensor in open_clip_to_ldm(text_encoder.state_dict(), te_config).items():
            checkpoint[LDM_OPEN_CLIP_PREFIX + key] = tensor
    return checkpoint


def convert_pipeline_to_single_file(
    pipeline_dir: str | Path,
    output_path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    sd_version: int | None = None,
) -> Path:
    """Write the U-Net, VAE and text encoder of ``pipeline_dir`` as one LDM-layout ``.safetensors``.

    ``dtype`` ("fp32", "fp16", "bf16" or a torch dtype) casts the floating-point weights; by
    default each model keeps the precision it is stored in. Tokenizer, scheduler and safety
    checker are not part of the original checkpoint layout: loaders take them from their own
    configs (``from_single_file(path, config=pipeline_dir)`` from the pipeline folder).
    Returns the output path.
    """
    pipeline_dir = Path(pipeline_dir)
    output_path = Path(output_path)
    torch_dtype = _torch_dtype(dtype)
    # Cheap checks first: don't load gigabytes of weights to then refuse the output path.
    _check_output(output_path, overwrite)
    _read_pipeline_index(pipeline_dir)

    unet, vae, text_encoder = _load_components(pipeline_dir, torch_dtype)
    checkpoint = pipeline_to_ldm(unet, vae, text_encoder, sd_version=sd_version)
    # safetensors wants contiguous tensors; views (e.g. the 1x1-conv reshapes) are copied here.
    tensors = {key: tensor.detach().contiguous() for key, tensor in checkpoint.items()}
    _save_atomically(tensors, output_path)
    return output_path
