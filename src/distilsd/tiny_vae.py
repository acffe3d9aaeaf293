"""Tiny autoencoders (diffusers' ``AutoencoderTiny``, the TAESD architecture) for a pipeline's VAE.

A tiny VAE works in the U-Net's latent space: its encoder returns ``vae_latents * scaling_factor``
of the pipeline's VAE and its decoder takes them back, so its own ``scaling_factor`` is 1 (as
TAESD's). That only holds for the VAE it was trained against: ``distilsd train --component
tiny-vae`` records that VAE's latent channels, scaling factor and downsampling in the tiny VAE's
folder (:data:`INFO_FILE`), and :func:`attach_tiny_vae` refuses a pipeline whose VAE differs.

``generate --vae tiny`` takes the ``tiny_vae/`` folder shipped inside a pipeline folder (the
built-in Shapes models have one), or, for architecture-only models, a random-weight tiny VAE.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from distilsd.errors import InputError, ModelLoadError

logger = logging.getLogger(__name__)

INFO_FILE = "distill_info.json"  # written by the trainer beside config.json
PIPELINE_SUBFOLDER = "tiny_vae"  # where a pipeline folder keeps its tiny VAE (`--vae tiny`)
TINY = "tiny"
# TAESD: 64 channels; one block at full resolution, three at each lower one.
TAESD_CHANNELS = 64
TAESD_BLOCKS = (1, 3, 3, 3)


def tiny_vae_config(vae_config: dict[str, Any], channels: int = TAESD_CHANNELS, blocks=()) -> dict[str, Any]:
    """An ``AutoencoderTiny`` config for a pipeline's VAE (``AutoencoderKL``) config.

    As many resolution levels as the VAE (so the same downsampling), its latent channels, and
    TAESD's block counts unless ``blocks`` gives them (one per level).
    """
    levels = len(vae_config["block_out_channels"])
    blocks = tuple(blocks) or (TAESD_BLOCKS[0], *(TAESD_BLOCKS[1:2] * (levels - 1)))
    if len(blocks) != levels:
        raise InputError(
            f"tiny VAE blocks {list(blocks)} must give one count per VAE level ({levels})",
            hint=f"e.g. vae.tiny_blocks=[{', '.join(['1'] + ['3'] * (levels - 1))}]",
        )
    return {
        "in_channels": vae_config.get("in_channels", 3),
        "out_channels": vae_config.get("out_channels", 3),
        "encoder_block_out_channels": [channels] * levels,
        "decoder_block_out_channels": [channels] * levels,
        "num_encoder_blocks": list(blocks),
        "num_decoder_blocks": list(reversed(blocks)),
        "latent_channels": vae_config["latent_channels"],
        "upsampling_scaling_factor": 2,
        "scaling_factor": 1.0,
        "force_upcast": False,
    }


def vae_signature(vae) -> dict[str, Any]:
    """What a tiny VAE must agree with: the VAE's latent channels, scaling and downsampling."""
    config = vae.config
    return {
        "latent_channels": int(config.latent_channels),
        "scaling_factor": float(config.scaling_factor),
        "shift_factor": None if config.get("shift_factor") is None else float(config.shift_factor),
        "downsampling": 2 ** (len(config.block_out_channels) - 1),
    }


def random_tiny_vae(vae, seed: int = 0):
    """A random-weight tiny VAE shaped for ``vae`` (architecture-only models, benchmarks)."""
    import torch
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoencoderTiny.from_config(tiny_vae_config(dict(vae.config))).eval()


def read_tiny_vae_info(folder: str | Path) -> dict[str, Any] | None:
    """The VAE signature a tiny VAE folder was trained against, or None (e.g. TAESD's own)."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("teacher_vae")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None


def check_tiny_vae_fits(tiny, vae, info: dict[str, Any] | None, name: str) -> None:
    """Refuse a tiny VAE whose latent channels, downsampling or scaling differ from ``vae``'s."""
    wanted = vae_signature(vae)
    hint = "train one against this model's VAE: distilsd train --component tiny-vae --model MODEL"
    channels = int(tiny.config.latent_channels)
    if channels != wanted["latent_channels"]:
        raise ModelLoadError(
            f"tiny VAE {name} has {channels} latent channels, the pipeline's VAE {wanted['latent_channels']}",
            hint=hint,
        )
    downsampling = 2 ** (len(tiny.config.decoder_block_out_channels) - 1)
    if downsampling != wanted["downsampling"]:
        raise ModelLoadError(
            f"tiny VAE {name} scales images by {downsampling}, the pipeline's VAE by {wanted['downsampling']}",
            hint=hint,
        )
    if float(tiny.config.scaling_factor) != 1.0:
        # diffusers divides by the decoder's own scaling_factor: a tiny VAE must take the
        # U-Net's (already scaled) latents as they are.
        raise ModelLoadError(
            f"tiny VAE {name} has scaling_factor {tiny.config.scaling_factor}; a tiny VAE works on the "
            "U-Net's scaled latents and needs 1.0"
        )
    if info is None:
        logger.warning(
            "tiny VAE %s does not say which VAE it was trained against (no %s); its latent scaling "
            "cannot be checked", name, INFO_FILE
        )  # fmt: skip
        return
    for key in ("scaling_factor", "shift_factor"):
        trained, current = info.get(key), wanted[key]
        same = (trained is None and current is None) or (
            trained is not None and current is not None and math.isclose(trained, current, rel_tol=1e-4)
        )
        if not same:
            raise ModelLoadError(
                f"tiny VAE {name} was trained for latents with {key} {trained}, the pipeline's VAE has {current}",
                hint=hint,
            )


def tiny_vae_folder(spec: str, model_folder: Path | None) -> Path:
    """The folder ``--vae`` names: a path, or ``tiny`` for the model folder's ``tiny_vae/``."""
    if spec != TINY:
        path = Path(spec)
        if not (path / "config.json").is_file():
            raise InputError(
                f"--vae {spec}: not a tiny VAE folder (no config.json)",
                hint="give a folder written by `distilsd train --component tiny-vae`, or 'tiny'",
            )
        return path
    if model_folder is None or not (model_folder / PIPELINE_SUBFOLDER / "config.json").is_file():
        raise InputError(
            "--vae tiny: this model ships no tiny VAE",
            hint="train one with `distilsd train --component tiny-vae` and pass its folder as --vae",
        )
    return model_folder / PIPELINE_SUBFOLDER


def load_tiny_vae(folder: str | Path, *, torch_dtype=None):
    """An ``AutoencoderTiny`` from a folder (``config.json`` + safetensors weights)."""
    from diffusers import AutoencoderTiny

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name", "AutoencoderTiny") != "AutoencoderTiny":
        raise ModelLoadError(
            f"{folder} holds a {config['_class_name']}, not an AutoencoderTiny",
            hint="--vae takes a tiny VAE (TAESD architecture) folder",
        )
    try:
        return AutoencoderTiny.from_pretrained(folder, torch_dtype=torch_dtype, use_safetensors=True).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load the tiny VAE in {folder}: {exc}") from None


def attach_tiny_vae(pipe, spec: str, *, model_folder: Path | None, random_weights: bool = False) -> str:
    """Swap a tiny VAE into ``pipe`` (refusing one that does not fit its VAE); returns its name.

    ``random_weights`` (architecture-only models) builds a random one for ``spec == "tiny"``.
    """
    dtype = next(pipe.vae.parameters()).dtype
    if spec == TINY and random_weights:
        tiny, info, name = random_tiny_vae(pipe.vae).to(dtype), vae_signature(pipe.vae), "tiny (random)"
    else:
        folder = tiny_vae_folder(spec, model_folder)
        tiny, info, name = load_tiny_vae(folder, torch_dtype=dtype), read_tiny_vae_info(folder), str(spec)
    check_tiny_vae_fits(tiny, pipe.vae, info, name)
    tiny.to(pipe.vae.device)
    pipe.vae = tiny
    pipe.register_modules(vae=tiny)
    return name
