"""Training LoRA adapters: peft ``LoraConfig`` on the U-Net (and text encoder), saved the diffusers way.

As diffusers' ``train_text_to_image_lora.py`` does it: the base weights are frozen,
``model.add_adapter(LoraConfig(...))`` inserts peft LoRA layers into the named modules, only
their parameters train, and ``get_peft_model_state_dict`` + ``convert_state_dict_to_diffusers``
give the tensors that ``StableDiffusionPipeline.save_lora_weights`` writes into
``pytorch_lora_weights.safetensors`` (with the adapter config as metadata, so that an alpha
other than the rank loads right in plain diffusers).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from distilsd.errors import InputError

from .names import EMBEDDINGS_DIR, KOHYA_WEIGHTS, LORA_INFO, LORA_WEIGHTS


def matching_modules(model: torch.nn.Module, targets: list[str]) -> dict[str, torch.nn.Module]:
    """The modules peft's ``target_modules`` list selects: the name is a target or ends in ``.target``."""
    return {
        name: module
        for name, module in model.named_modules()
        if any(name == t or name.endswith("." + t) for t in targets)
    }


def _max_rank(module: torch.nn.Module) -> int | None:
    if isinstance(module, torch.nn.Linear):
        return min(module.in_features, module.out_features)
    if isinstance(module, torch.nn.Conv2d):
        kh, kw = module.kernel_size
        return min(module.in_channels * kh * kw, module.out_channels)
    return None


def add_lora(
    model: torch.nn.Module,
    *,
    rank: int,
    alpha: float | None,
    targets: list[str],
    dropout: float = 0.0,
    what: str = "U-Net",
) -> None:
    """Freeze ``model`` and add one trainable peft LoRA adapter (``default``) on ``targets``."""
    from peft import LoraConfig

    if rank < 1:
        raise InputError(f"LoRA rank {rank} must be at least 1")
    found = matching_modules(model, targets)
    if not found:
        raise InputError(
            f"no module of the {what} matches the LoRA targets {', '.join(targets)}",
            hint="U-Net attention: to_q,to_k,to_v,to_out.0; CLIP text encoder: q_proj,k_proj,v_proj,out_proj",
        )
    unusable = [name for name, module in found.items() if _max_rank(module) is None]
    if unusable:
        raise InputError(
            f"LoRA target {unusable[0]} of the {what} is a {type(found[unusable[0]]).__name__}; only Linear and Conv2d layers take adapters"
        )
    for name, module in found.items():
        if rank > _max_rank(module):
            raise InputError(
                f"LoRA rank {rank} is larger than the layer {name} of the {what} allows ({_max_rank(module)})",
                hint=f"use --lora-rank {_max_rank(module)} or less, or leave that layer out of --lora-targets",
            )
    model.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=list(targets),
    )
    if hasattr(model, "add_adapter") and what == "U-Net":
        model.add_adapter(config)  # diffusers' PeftAdapterMixin
    else:
        # transformers' own add_adapter wants a newer peft than diffusers does; it wraps this call.
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, model, adapter_name="default")
        model.peft_config = {"default": config}


def adapter_tensors(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The adapter of ``model`` in a key layout diffusers' ``load_lora_weights`` reads whole.

    Adapters on the attention projections only get diffusers' own layout
    (``...to_q.lora.down.weight``), as its LoRA training examples write them. diffusers renames
    only those projections' keys, so an adapter that also sits on other modules (convolutions,
    feed-forwards) would come out in two layouts, and diffusers' loader reads a file in one
    layout and silently drops the rest: such adapters keep peft's layout (``lora_A``/``lora_B``)
    for every key. ``state_dict`` replaces the model's own tensors (the EMA weights, say).
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    peft_state = get_peft_model_state_dict(model, state_dict=state_dict)
    converted = convert_state_dict_to_diffusers(peft_state)
    if any(".lora_A." in key or ".lora_B." in key for key in converted):
        converted = peft_state
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in converted.items()}


def adapter_metadata(model: torch.nn.Module) -> dict[str, Any]:
    """The adapter's peft config as diffusers stores it beside the tensors (rank, alpha, targets)."""
    return model.peft_config["default"].to_dict()


def save_lora(
    folder: str | Path,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    *,
    unet_state: dict[str, torch.Tensor] | None = None,
    kohya: bool = False,
    info: dict[str, Any] | None = None,
    word_embeddings: torch.nn.Module | None = None,
) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` (and the kohya layout, and ``lora_info.json``).

    ``word_embeddings`` (a :class:`~distilsd.lora.embeddings.WordEmbeddings`) adds
    ``embeddings/<word>.safetensors`` per trained word, listed in the info's ``token_embeddings``.
    Each file is written beside its final name and renamed into place, so an interrupted save
    leaves the previous files as they were.
    """
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet_layers = adapter_tensors(unet, unet_state)
    te_layers = adapter_tensors(text_encoder) if text_encoder is not None else None
    metadata = {"unet_lora_adapter_metadata": adapter_metadata(unet)}
    if text_encoder is not None:
        metadata["text_encoder_lora_adapter_metadata"] = adapter_metadata(text_encoder)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".lora-") as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=unet_layers, text_encoder_lora_layers=te_layers, **metadata
        )
        if kohya:
            from .files import write_kohya

            write_kohya(Path(tmp) / LORA_WEIGHTS, Path(tmp) / KOHYA_WEIGHTS)
        if word_embeddings is not None:
            from .embeddings import save_word_embeddings

            written = save_word_embeddings(Path(tmp), word_embeddings)
            if info is not None:
                info = {**info, "token_embeddings": written}
            (folder / EMBEDDINGS_DIR).mkdir(exist_ok=True)
            for item in (Path(tmp) / EMBEDDINGS_DIR).iterdir():
                os.replace(item, folder / EMBEDDINGS_DIR / item.name)
            (Path(tmp) / EMBEDDINGS_DIR).rmdir()
        if info is not None:
            (Path(tmp) / LORA_INFO).write_text(json.dumps(info, indent=1))
        for item in Path(tmp).iterdir():
            os.replace(item, folder / item.name)
    return folder / LORA_WEIGHTS
