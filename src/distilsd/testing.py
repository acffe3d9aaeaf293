"""Tiny Stable Diffusion pipelines for tests and examples.

They have the real SD v1 topology (4 U-Net stages, cross-attention in the first three, a
mid block; a 4-level VAE with an 8x downscale; a CLIP text encoder with the real
tokenizer) at a few MB and random weights, and are saved in plain diffusers format, so
everything distilsd does with a real model can be run on them in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_CROSS_ATTENTION_DIM = 32


def tiny_unet_config(
    cross_attention_dim: int = TINY_CROSS_ATTENTION_DIM, sd_version: int = 1, **overrides: Any
) -> dict[str, Any]:
    """An SD-topology U-Net config at toy size (v2 adds linear projection and per-block heads)."""
    config: dict[str, Any] = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [16, 32, 32, 32],
        "layers_per_block": 2,
        "down_block_types": [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 2,
        "norm_num_groups": 8,
    }
    if sd_version == 2:
        config.update(attention_head_dim=[1, 2, 4, 4], use_linear_projection=True)
    config.update(overrides)
    return config


def tiny_unet(seed: int = 0, **config_kwargs: Any):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config(**config_kwargs))


def tiny_vae(seed: int = 0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[8, 16, 16, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )


def tiny_text_encoder(hidden_size: int = TINY_CROSS_ATTENTION_DIM, seed: int = 0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=hidden_size,
    )
    return CLIPTextModel(config)


def tiny_safety_checker(seed: int = 0):
    """A random StableDiffusionSafetyChecker and its image processor.

    Its concept thresholds are those of the real checker's init (1.0), so with random
    weights no image is flagged; set ``concept_embeds_weights`` below zero to flag all.
    """
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, processor


def tiny_pipeline(
    cross_attention_dim: int = TINY_CROSS_ATTENTION_DIM,
    sd_version: int = 1,
    safety_checker: bool = False,
    seed: int = 0,
):
    """A StableDiffusionPipeline of tiny random models with the real CLIP tokenizer."""
    from diffusers import StableDiffusionPipeline

    from distilsd.assets import clip_tokenizer
    from distilsd.compress.teacher import preset_scheduler

    # The SD v1 / v2 scheduler (their scheduler_config.json), from the architecture presets.
    scheduler = preset_scheduler("sd-v1" if sd_version == 1 else "sd-v2")
    checker, processor = tiny_safety_checker(seed) if safety_checker else (None, None)
    return StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(cross_attention_dim, seed),
        tokenizer=clip_tokenizer(),
        unet=tiny_unet(seed, cross_attention_dim=cross_attention_dim, sd_version=sd_version),
        scheduler=scheduler,
        safety_checker=checker,
        feature_extractor=processor,
        requires_safety_checker=safety_checker,
    )


def save_tiny_pipeline(path: str | Path, **kwargs: Any) -> Path:
    """Build :func:`tiny_pipeline` and save it in diffusers format (safetensors) at ``path``."""
    path = Path(path)
    tiny_pipeline(**kwargs).save_pretrained(path, safe_serialization=True)
    return path


def save_random_lora(
    pipeline_dir: str | Path,
    output: str | Path,
    *,
    rank: int = 4,
    seed: int = 0,
    std: float = 0.5,
    text_encoder: bool = False,
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
) -> Path:
    """A LoRA with random weights for the pipeline at ``pipeline_dir``, written as ``output`` (a .safetensors file).

    Built the way training builds one (peft adapters on the U-Net's ``targets``, by default its
    attention projections, saved by :func:`distilsd.lora.adapters.save_lora`), but with the up-projections drawn at
    random instead of trained from zero, so that it changes images at once; ``std`` sets how much.
    """
    import shutil
    import tempfile

    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from distilsd.lora.adapters import add_lora, save_lora

    # Plain safetensors loads of a test pipeline: distilsd.models imports this module (the
    # built-in tiny-random model), so this one must not import distilsd.models back.
    output = Path(output)
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet", use_safetensors=True)
    add_lora(unet, rank=rank, alpha=rank, targets=list(targets))
    models = [unet]
    encoder = None
    if text_encoder:
        encoder = CLIPTextModel.from_pretrained(Path(pipeline_dir) / "text_encoder", use_safetensors=True)
        add_lora(encoder, rank=rank, alpha=rank, targets=["q_proj", "v_proj"], what="text encoder")
        models.append(encoder)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for name, parameter in sorted(model.named_parameters()):
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    with tempfile.TemporaryDirectory() as tmp:
        written = save_lora(tmp, unet, encoder)
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(written, output)
    return output
