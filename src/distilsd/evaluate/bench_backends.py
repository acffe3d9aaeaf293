"""What ``distilsd bench`` runs for each backend: one runner per component, in a worker process.

A backend is a function ``(model components, batch size, steps, resolutions) -> {component:
runner(resolution)}``; :data:`BACKENDS` maps each name to one. ``pytorch`` runs the modules as
built. ``openvino``, ``openvino-int8`` and ``onnx`` export them first (with :mod:`distilsd.deploy`)
at every benchmarked resolution (static shapes, so one export per resolution) into a
temporary folder while the worker builds, drop the PyTorch modules (so the peak RAM reported
is the runtime's, not the runtime's plus PyTorch's), and then time the exported components
and a stock diffusers pipeline on them, as ``generate`` runs them. The bench ``--dtype`` picks
their precision: fp32 -> fp32, bf16 -> bf16 (fp32 where the CPU has no bf16, said on stderr);
``openvino-int8`` is NNCF int8 whatever the dtype. Export time and peak memory are logged per
resolution. Runtimes are imported only when a worker builds them.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distilsd.errors import InputError

logger = logging.getLogger(__name__)

TEXT_TOKENS = 77


@dataclass
class ModelComponents:
    """The modules of one model in one dtype on one device (None where not built)."""

    unet: Any = None
    text_encoder: Any = None
    vae: Any = None
    pipeline: Any = None  # a diffusers pipeline, built only for the ``pipeline`` component
    device: Any = None
    dtype: Any = None
    vae_scale_factor: int = 8
    # The model's own VAE when ``vae`` is a tiny decoder swapped in (exports are made with it).
    full_vae: Any = None


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS is not inflated by build-time copies."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may include freed build-time memory
        pass


def pytorch_runners(
    model: ModelComponents, batch_size: int, steps: int, resolutions: list[int]
) -> dict[str, Callable[[int], None]]:
    """One callable per component: run it once at ``resolution`` px and wait until it is done."""
    import torch

    device, dtype = model.device, model.dtype

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @torch.inference_mode()
    def text_encoder(resolution: int) -> None:
        tokens = torch.zeros(batch_size, TEXT_TOKENS, dtype=torch.long, device=device)  # [B, 77]
        model.text_encoder(tokens)
        synchronize()

    @torch.inference_mode()
    def unet(resolution: int) -> None:
        config = model.unet.config
        latent = resolution // model.vae_scale_factor
        cross = (
            config.cross_attention_dim
            if isinstance(config.cross_attention_dim, int)
            else config.cross_attention_dim[0]
        )
        sample = torch.randn(
            batch_size, config.in_channels, latent, latent, device=device, dtype=dtype
        )  # [B, 4, h, w]
        text = torch.randn(batch_size, TEXT_TOKENS, cross, device=device, dtype=dtype)  # [B, 77, D]
        embedding = config.get("time_cond_proj_dim")  # an LCM student's guidance-scale input
        cond = None if embedding is None else torch.randn(batch_size, embedding, device=device, dtype=dtype)
        model.unet(sample, torch.tensor(999, device=device), encoder_hidden_states=text, timestep_cond=cond)
        synchronize()

    @torch.inference_mode()
    def vae_decode(resolution: int) -> None:
        latent = resolution // model.vae_scale_factor
        latents = torch.randn(
            1, model.vae.config.latent_channels, latent, latent, device=device, dtype=dtype
        )  # one image
        model.vae.decode(latents / model.vae.config.scaling_factor)
        synchronize()

    def pipeline(resolution: int) -> None:
        model.pipeline.set_progress_bar_config(disable=True)
        model.pipeline(
            "a photo of a cat", num_inference_steps=steps, guidance_scale=_guidance_scale(model.pipeline, batch_size),
            height=resolution, width=resolution, generator=torch.Generator("cpu").manual_seed(0), output_type="pil",
        )  # fmt: skip
        synchronize()

    runners = {"text_encoder": text_encoder, "unet": unet, "vae_decode": vae_decode, "pipeline": pipeline}
    available = {
        "text_encoder": model.text_encoder,
        "unet": model.unet,
        "vae_decode": model.vae,
        "pipeline": model.pipeline,
    }
    return {name: runner for name, runner in runners.items() if available[name] is not None}


def _guidance_scale(pipe, batch_size: int) -> float:
    """7.5 with a guidance batch or a guidance embedding (LCM students), else 1 (no guidance)."""
    return 7.5 if batch_size > 1 or pipe.unet.config.get("time_cond_proj_dim") is not None else 1.0


# --------------------------------------------------------------------------- exported runtimes


def _source_pipeline(model):
    """A diffusers pipeline (fp32) on the bench worker's modules, for exporting and calibrating."""
    import torch
    from diffusers import StableDiffusionPipeline

    from distilsd.assets import clip_tokenizer
    from distilsd.compress.teacher import preset_scheduler

    vae = model.full_vae if model.full_vae is not None else model.vae
    if model.pipeline is not None:
        pipe = model.pipeline.to("cpu", torch.float32)
        if vae is not pipe.vae:
            pipe = StableDiffusionPipeline(**{**pipe.components, "vae": vae.to("cpu", torch.float32)})
        return pipe
    if model.text_encoder is None or vae is None:
        raise InputError(
            "exported backends need the whole model: add --components text_encoder,unet,vae_decode or pipeline"
        )
    scheduler = preset_scheduler("sd-v1")
    return StableDiffusionPipeline(
        vae=vae.to("cpu", torch.float32), text_encoder=model.text_encoder.to("cpu", torch.float32), tokenizer=clip_tokenizer(),
        unet=model.unet.to("cpu", torch.float32), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip


def _export_all(source, resolutions: list[int], workdir: Path, batch_size: int, fmt: str, precision: str):
    """{resolution: exported pipeline}: one static-shape export per resolution."""
    import json

    from distilsd.deploy.export import ExportSettings, export_pipeline
    from distilsd.deploy.quantize import DEFAULT_CALIBRATION_PROMPTS
    from distilsd.deploy.runtime import MANIFEST_NAME, exported_pipeline

    pipelines = {}
    for resolution in resolutions:
        settings = ExportSettings(
            format=fmt, precision=precision, width=resolution, height=resolution, batch_size=max(1, batch_size // 2),
            guidance=batch_size > 1, vae_encoder=False,
            # int8 speed does not depend on calibration quality: calibrate briefly.
            calibration_prompts=DEFAULT_CALIBRATION_PROMPTS[:4], calibration_steps=5, quick_calibration=True,
        )  # fmt: skip
        folder = export_pipeline(source, workdir / f"{resolution}", settings, {"name": "bench"})
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        logger.info(
            "exported to %s %s at %d px in %.1f s, process peak memory %.2f GiB",
            fmt,
            precision,
            resolution,
            manifest["export_seconds"],
            manifest["export_peak_rss_bytes"] / 2**30,
        )
        pipe = exported_pipeline(folder)
        pipe.set_progress_bar_config(disable=True)
        pipelines[resolution] = pipe
    return pipelines


def _exported_runners(
    model, batch_size: int, steps: int, resolutions: list[int], fmt: str, precision: str
) -> dict[str, Callable[[int], None]]:
    import numpy as np
    import torch

    if model.device.type != "cpu":
        raise InputError(f"the {fmt} backend runs on the CPU", hint="use --device cpu")
    if fmt == "onnx" and precision != "fp32":
        raise InputError(
            "the onnx backend runs fp32 only", hint="use --dtype fp32, or the openvino backend for bf16"
        )
    workdir = tempfile.TemporaryDirectory(prefix=f"distilsd-bench-{fmt}-")
    with_pipeline = model.pipeline is not None  # only when the pipeline component was asked for
    pipelines = _export_all(
        _source_pipeline(model), resolutions, Path(workdir.name), batch_size, fmt, precision
    )
    tiny_decoder = model.vae if model.full_vae is not None and model.vae is not model.full_vae else None
    for pipe in pipelines.values():
        pipe._bench_workdir = workdir  # keep the folder alive as long as the pipelines
        if tiny_decoder is not None:
            # A tiny decoder stays a PyTorch module (fp32) under the exported U-Net and text encoder.
            pipe.vae = tiny_decoder.to("cpu", torch.float32)
            pipe.register_modules(vae=pipe.vae)
    # The exports hold everything the runners need: free the PyTorch weights.
    model.unet = model.text_encoder = model.vae = model.full_vae = model.pipeline = None
    release_freed_memory()

    def text_encoder(resolution: int) -> None:
        pipe = pipelines[resolution]
        pipe.text_encoder(torch.zeros(batch_size, TEXT_TOKENS, dtype=torch.long))

    def unet(resolution: int) -> None:
        pipe = pipelines[resolution]
        latent = resolution // pipe.vae_scale_factor
        cross = pipe.text_encoder.config.hidden_size
        runner = pipe.unet.runner
        inputs = {
            "sample": np.random.randn(batch_size, pipe.unet.config.in_channels, latent, latent).astype(np.float32),
            "timestep": np.full([batch_size], 999.0, dtype=np.float32),
            "encoder_hidden_states": np.random.randn(batch_size, TEXT_TOKENS, cross).astype(np.float32),
        }
        if "timestep_cond" in runner.inputs:  # an LCM student's guidance-scale embedding
            embedding = pipe.unet.config["time_cond_proj_dim"]
            inputs["timestep_cond"] = np.random.randn(batch_size, embedding).astype(np.float32)
        runner(**inputs)

    def vae_decode(resolution: int) -> None:
        pipe = pipelines[resolution]
        latent = resolution // pipe.vae_scale_factor
        with torch.inference_mode():
            pipe.vae.decode(torch.randn(1, pipe.vae.config.latent_channels, latent, latent))

    def pipeline(resolution: int) -> None:
        pipelines[resolution](
            "a photo of a cat", num_inference_steps=steps, guidance_scale=_guidance_scale(pipelines[resolution], batch_size),
            height=resolution, width=resolution, generator=torch.Generator("cpu").manual_seed(0), output_type="pil",
        )  # fmt: skip

    runners = {"text_encoder": text_encoder, "unet": unet, "vae_decode": vae_decode}
    if with_pipeline:
        runners["pipeline"] = pipeline
    return runners


def openvino_runners(
    model, batch_size: int, steps: int, resolutions: list[int]
) -> dict[str, Callable[[int], None]]:
    precision = "bf16" if str(model.dtype) == "torch.bfloat16" else "fp32"
    return _exported_runners(model, batch_size, steps, resolutions, "openvino", precision)


def openvino_int8_runners(
    model, batch_size: int, steps: int, resolutions: list[int]
) -> dict[str, Callable[[int], None]]:
    return _exported_runners(model, batch_size, steps, resolutions, "openvino", "int8")


def onnx_runners(
    model, batch_size: int, steps: int, resolutions: list[int]
) -> dict[str, Callable[[int], None]]:
    precision = "bf16" if str(model.dtype) == "torch.bfloat16" else "fp32"
    return _exported_runners(model, batch_size, steps, resolutions, "onnx", precision)


# name -> function(model components, batch size, steps, resolutions) -> {component: runner(resolution)}.
BACKENDS: dict[str, Callable[[ModelComponents, int, int, list[int]], dict[str, Callable[[int], None]]]] = {
    "pytorch": pytorch_runners,
    "openvino": openvino_runners,
    "openvino-int8": openvino_int8_runners,
    "onnx": onnx_runners,
}
