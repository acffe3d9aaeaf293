"""``distilsd bench`` backends for the exported runtimes: openvino, openvino-int8, onnx.

Each backend takes the bench worker's PyTorch components, exports them at every benchmarked
resolution (static shapes, so one export per resolution) into a temporary folder while the
worker builds, drops the PyTorch modules (so the peak RAM reported is the runtime's, not the
runtime's plus PyTorch's), and then times the exported components and a stock diffusers
pipeline on them, as ``generate`` runs them. The bench ``--dtype`` picks the precision: fp32 -> f32,
bf16 -> bf16 (f32 where the CPU has no bf16, said on stderr); ``openvino-int8`` is NNCF int8
whatever the dtype. Export time and peak memory are printed on stderr per resolution.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from distilsd.errors import InputError

TEXT_TOKENS = 77


def _source_pipeline(model):
    """A diffusers pipeline (fp32) on the bench worker's modules, for exporting and calibrating."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from distilsd.assets import clip_tokenizer

    if model.pipeline is not None:
        return model.pipeline.to("cpu", torch.float32)
    if model.text_encoder is None or model.vae is None:
        raise InputError(
            "exported backends need the whole model: add --components text_encoder,unet,vae_decode or pipeline"
        )
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    )  # fmt: skip
    return StableDiffusionPipeline(
        vae=model.vae.to("cpu", torch.float32), text_encoder=model.text_encoder.to("cpu", torch.float32), tokenizer=clip_tokenizer(),
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
        print(
            f"exported to {fmt} {precision} at {resolution} px in {manifest['export_seconds']:.1f} s, "
            f"process peak memory {manifest['export_peak_rss_bytes'] / 2**30:.2f} GiB",
            file=sys.stderr,
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

    from distilsd.evaluate.bench import release_freed_memory

    if model.device.type != "cpu":
        raise InputError(f"the {fmt} backend runs on the CPU", hint="use --device cpu")
    if fmt == "onnx" and precision != "f32":
        raise InputError(
            "the onnx backend runs fp32 only", hint="use --dtype fp32, or the openvino backend for bf16"
        )
    workdir = tempfile.TemporaryDirectory(prefix=f"distilsd-bench-{fmt}-")
    with_pipeline = model.pipeline is not None  # only when the pipeline component was asked for
    pipelines = _export_all(
        _source_pipeline(model), resolutions, Path(workdir.name), batch_size, fmt, precision
    )
    for pipe in pipelines.values():
        pipe._bench_workdir = workdir  # keep the folder alive as long as the pipelines
    # The exports hold everything the runners need: free the PyTorch weights.
    model.unet = model.text_encoder = model.vae = model.pipeline = None
    release_freed_memory()

    def text_encoder(resolution: int) -> None:
        pipe = pipelines[resolution]
        pipe.text_encoder(torch.zeros(batch_size, TEXT_TOKENS, dtype=torch.long))

    def unet(resolution: int) -> None:
        pipe = pipelines[resolution]
        latent = resolution // pipe.vae_scale_factor
        cross = pipe.text_encoder.config.hidden_size
        runner = pipe.unet.runner
        runner(
            sample=np.random.randn(batch_size, pipe.unet.config.in_channels, latent, latent).astype(
                np.float32
            ),
            timestep=np.full([batch_size], 999.0, dtype=np.float32),
            encoder_hidden_states=np.random.randn(batch_size, TEXT_TOKENS, cross).astype(np.float32),
        )

    def vae_decode(resolution: int) -> None:
        pipe = pipelines[resolution]
        latent = resolution // pipe.vae_scale_factor
        pipe.vae.decode(torch.randn(1, pipe.vae.config.latent_channels, latent, latent))

    def pipeline(resolution: int) -> None:
        pipelines[resolution](
            "a photo of a cat", num_inference_steps=steps, guidance_scale=7.5 if batch_size > 1 else 1.0,
            height=resolution, width=resolution, generator=torch.Generator("cpu").manual_seed(0), output_type="pil",
        )  # fmt: skip

    runners = {"text_encoder": text_encoder, "unet": unet, "vae_decode": vae_decode}
    if with_pipeline:
        runners["pipeline"] = pipeline
    return runners


def openvino_runners(
    model, batch_size: int, steps: int, resolutions: list[int]
) -> dict[str, Callable[[int], None]]:
    precision = "bf16" if str(model.dtype) == "torch.bfloat16" else "f32"
    return _exported_runners(model, batch_size, steps, resolutions, "openvino", precision)


def openvino_int8_runners(
    model, batch_size: int, steps: int, resolutions: list[int]
) -> dict[str, Callable[[int], None]]:
    return _exported_runners(model, batch_size, steps, resolutions, "openvino", "int8")


def onnx_runners(
    model, batch_size: int, steps: int, resolutions: list[int]
) -> dict[str, Callable[[int], None]]:
    precision = "bf16" if str(model.dtype) == "torch.bfloat16" else "f32"
    return _exported_runners(model, batch_size, steps, resolutions, "onnx", precision)


# Added to distilsd.evaluate.bench.BACKENDS.
DEPLOY_BACKENDS = {"openvino": openvino_runners, "openvino-int8": openvino_int8_runners, "onnx": onnx_runners}
