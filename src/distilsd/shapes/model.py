"""The Shapes model's architecture: SD v1's topology at a size a 2-core CPU trains in two hours.

``distilsd shapes init -o DIR`` writes a pipeline folder with random weights in these
configs; the recipes in ``distilsd/distill/recipes/shapes-*.yaml`` then train its VAE, its
text encoder and U-Net with ``distilsd train``, and distill bk-tiny students from it.

- VAE: AutoencoderKL, 3 levels (a 4x downscale: 64 px images -> 16x16x4 latents; SD's 8x
  would leave a small star 1-2 latent pixels wide);
- text encoder: a 3-layer CLIP text transformer with the real CLIP tokenizer, padding to 24
  tokens instead of SD's 77 (captions are at most 17): see TEXT_TOKENS;
- U-Net: SD v1's blocks (4 stages, cross-attention in the first three, a cross-attention mid
  block, 2 layers per block, so the BK-SDM presets apply unchanged) at 32-96 channels;
- scheduler: SD v1's betas made zero-terminal-SNR and shifted to 16x the SNR for 16x16
  latents, v-prediction and DDIM with trailing timesteps: see SCHEDULER_CONFIG.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from distilsd.errors import OutputError

IMAGE_SIZE = 64
CROSS_ATTENTION_DIM = 128

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64, 96, 96],
    "layers_per_block": 2,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "cross_attention_dim": CROSS_ATTENTION_DIM,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "sample_size": IMAGE_SIZE,
    "scaling_factor": 1.0,  # set from the data when the VAE is trained
}

TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": CROSS_ATTENTION_DIM,
    "intermediate_size": 4 * CROSS_ATTENTION_DIM,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "max_position_embeddings": 77,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
    "projection_dim": CROSS_ATTENTION_DIM,
}

# Prompts are padded to this many tokens. SD's 77 would leave a Shapes caption (at most 17
# tokens) among 60 or more padding tokens that differ little between captions, and
# cross-attention starts out nearly uniform over all of them, so most of what a query reads
# at first would be padding.
TEXT_TOKENS = 24

# SD v1's scaled-linear betas, rescaled to zero terminal SNR (Lin et al. 2024, "Common
# Diffusion Noise Schedules and Sample Steps are Flawed"), then shifted to 16x the SNR at every
# step (Hoogeboom et al. 2023, "simple diffusion": the same noise destroys more of a smaller
# image, so shift log-SNR by 2 log(64 / 16) for 16x16 latents against SD's 64x64). The model
# predicts v and samples with DDIM from t = 999 ("trailing").
# - Zero terminal SNR: SD's schedule keeps sqrt(alpha_bar) = 0.068 of the image at the last
#   step, and on 16x16 latents whose flat backgrounds shift every channel's mean by up to
#   +-1.8 the mean over 256 positions still shows the background there, so a teacher learned
#   to read it and, sampling from pure noise, invented washed-out ones. At zero SNR epsilon is
#   undefined, so the model predicts v (as SD 2's 768-v).
# - The shift: unshifted, a teacher's x0 prediction from SNR 1.3 (t = 300 of 1,000) was already
#   a blurred blob, half the training steps fell below SNR 0.3, and after 3,000 steps it drew
#   colour-matched blobs and no shapes (docs/results.md, "Shapes model development").
SNR_SHIFT = 16.0

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "trained_betas": None,  # shifted_betas(), filled in by scheduler_config()
    "rescale_betas_zero_snr": True,  # a no-op on betas ending in 1; tells samplers the SNR ends at 0
    "timestep_spacing": "trailing",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
}


def shifted_betas(snr_shift: float = SNR_SHIFT) -> list[float]:
    """SD's zero-terminal-SNR betas with every step's SNR multiplied by ``snr_shift``."""
    import torch
    from diffusers import DDPMScheduler

    sd = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True
    )
    log_snr = torch.logit(sd.alphas_cumprod.double()) + torch.log(
        torch.tensor(snr_shift, dtype=torch.float64)
    )
    alphas_cumprod = torch.sigmoid(log_snr)  # the last stays exactly 0
    alphas = alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return [round(float(beta), 10) for beta in 1.0 - alphas]


def scheduler_config() -> dict[str, Any]:
    """SCHEDULER_CONFIG with its betas: pass to DDIMScheduler(**...)."""
    return {**SCHEDULER_CONFIG, "trained_betas": shifted_betas()}


def shapes_tokenizer():
    """The CLIP tokenizer (standard vocabulary and ids), padding to TEXT_TOKENS."""
    from transformers import CLIPTokenizer

    from distilsd.assets import CLIP_TOKENIZER_DIR

    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, model_max_length=TEXT_TOKENS)


def unet_config_with_channels(channels: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """The Shapes U-Net config with other channel counts for its 4 levels (e.g. a wider teacher).

    Each count must split into the config's group-norm groups and attention heads.
    """
    from distilsd.errors import InputError

    groups, heads = UNET_CONFIG["norm_num_groups"], UNET_CONFIG["attention_head_dim"]
    levels = len(UNET_CONFIG["block_out_channels"])
    if len(channels) != levels or any(c <= 0 or c % groups or c % heads for c in channels):
        raise InputError(
            f"U-Net channels {list(channels)} are not {levels} positive multiples of {groups}",
            hint=f"e.g. {','.join(str(c) for c in UNET_CONFIG['block_out_channels'])} (the default) or 64,96,128,128",
        )
    return {**UNET_CONFIG, "block_out_channels": list(channels)}


def build_pipeline(seed: int = 0, unet_config: dict[str, Any] | None = None):
    """A StableDiffusionPipeline of the Shapes architecture with random weights."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))
        unet = UNet2DConditionModel(**(unet_config or UNET_CONFIG))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=shapes_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def init_model(
    output_dir: str | Path,
    *,
    seed: int = 0,
    unet_config: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the untrained Shapes pipeline (safetensors) to ``output_dir``, atomically."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise OutputError(f"{output_dir} already exists", hint="choose another folder, or pass --overwrite")
    tmp = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    build_pipeline(seed, unet_config).save_pretrained(tmp, safe_serialization=True)
    (tmp / "shapes_model.json").write_text(json.dumps({"stage": "init", "seed": seed}, indent=2) + "\n")
    if output_dir.exists():
        shutil.rmtree(output_dir)
    tmp.rename(output_dir)
    return output_dir


# ---- the shipped models -----------------------------------------------------------------------

SHIPPED_DIR = Path(__file__).parent / "assets" / "models"
# Shipped parts (fp16 safetensors): the teacher's vae/, text_encoder/, unet/, scheduler/ and
# model_index.json in shapes/, only the student's unet/ in shapes-tiny/; shapes-tiny-lcm/ has
# its unet/ and what makes it sample as an LCM: scheduler/ (LCMScheduler), model_index.json and
# distill_info.json (its default steps and guidance, as an LCM run folder's). A student takes
# every part it lacks from shapes/. The tokenizer is distilsd's CLIP tokenizer asset. A
# pipeline folder is assembled in the cache on first use. distilsd.models.BUILTIN_MODELS lists
# these names (via builtin_pipeline); scripts/ship_shapes_model.py and ship_shapes_lcm.py write them.
SHIPPED_MODELS = ("shapes", "shapes-tiny", "shapes-tiny-lcm")


def _shipped_files(name: str) -> list[Path]:
    files = sorted(p for p in (SHIPPED_DIR / name).rglob("*") if p.is_file())
    if name != "shapes":
        files += _shipped_files("shapes")
    return files


def builtin_pipeline(name: str, models_dir: Path) -> Path:
    """A pipeline folder of the built-in Shapes model ``name``, assembled once into ``models_dir``.

    ``models_dir`` is the cache's models folder (:func:`distilsd.models.cache_dir`), passed in
    so that this module stays below :mod:`distilsd.models`, which lists it as a built-in.

    The cache folder's name carries a hash of the shipped files' contents (about 0.1 s), so a
    newer distilsd with retrained weights assembles a new folder instead of reusing a stale one.
    """
    import hashlib
    import os

    from distilsd.errors import ModelLoadError

    if name not in SHIPPED_MODELS:
        raise ValueError(name)
    files = _shipped_files(name)
    if not (SHIPPED_DIR / name / "unet" / "config.json").is_file():
        raise ModelLoadError(
            f"the built-in model '{name}' is missing from this installation ({SHIPPED_DIR / name})",
            hint="reinstall distilsd (its package data includes distilsd/shapes/assets/models)",
        )
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(SHIPPED_DIR)).encode())
        digest.update(path.read_bytes())
    folder = Path(models_dir) / f"{name}-{digest.hexdigest()[:12]}"
    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    own, teacher = SHIPPED_DIR / name, SHIPPED_DIR / "shapes"
    for component in ("vae", "text_encoder", "unet", "scheduler", "tiny_vae"):
        source = own / component if (own / component).is_dir() else teacher / component
        if component == "tiny_vae" and not source.is_dir():
            continue  # an installation from before the tiny VAE was shipped
        shutil.copytree(source, tmp / component)
    shapes_tokenizer().save_pretrained(tmp / "tokenizer")
    for info in ("model_index.json", "distill_info.json"):
        source = own / info if (own / info).is_file() else teacher / info
        if source.is_file():  # the teacher ships no distill_info.json
            shutil.copy2(source, tmp / info)
    try:
        tmp.rename(folder)
    except OSError:  # another process assembled it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
