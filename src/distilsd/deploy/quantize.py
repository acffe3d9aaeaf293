"""int8 exports with NNCF (OpenVINO only).

- U-Net: weights and activations (``nncf.quantize``, transformer preset), calibrated on the
  inputs the U-Net really sees: the source pipeline is run on a few prompts and every U-Net
  call (latents, timestep, text embeddings, guidance batch included) is recorded.
- Text encoder and VAE: weights only (``nncf.compress_weights``, int8): they run once per
  image, and their activations (the VAE's especially) lose visible quality when quantized.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from distilsd.deploy.runtime import import_openvino
from distilsd.errors import MissingDependencyError

DEFAULT_CALIBRATION_PROMPTS = [
    "a photo of a cat sitting on a wooden table",
    "a mountain landscape at sunset, oil painting",
    "a red sports car on a city street at night",
    "a bowl of fruit, studio lighting",
    "a portrait of an old man with a beard",
    "a small house in a snowy forest",
    "an astronaut riding a horse on the moon",
    "a blue circle and a yellow square on a white background",
]


def collect_unet_inputs(
    pipe, prompts: list[str], batch_size: int, steps: int, width: int, height: int, seed: int = 0
) -> list[dict[str, Any]]:
    """Run ``pipe`` (PyTorch) on ``prompts`` and record every U-Net call's inputs as numpy arrays."""
    import numpy as np
    import torch

    samples: list[dict[str, Any]] = []

    def record(module, args, kwargs):
        sample = args[0]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        hidden = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        inputs = {
            "sample": np.ascontiguousarray(sample.detach().float().numpy()),
            "timestep": np.ascontiguousarray(t.numpy()),
            "encoder_hidden_states": np.ascontiguousarray(hidden.detach().float().numpy()),
        }
        if kwargs.get("timestep_cond") is not None:  # an LCM student's guidance embedding
            inputs["timestep_cond"] = np.ascontiguousarray(kwargs["timestep_cond"].detach().float().numpy())
        samples.append(inputs)

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe.set_progress_bar_config(disable=True)
        for start in range(0, len(prompts), batch_size):
            group = prompts[start : start + batch_size]
            group += [group[-1]] * (batch_size - len(group))  # keep the exported batch
            with torch.inference_mode():
                pipe(
                    prompt=group, num_inference_steps=steps, guidance_scale=7.5, height=height, width=width, output_type="latent",
                    generator=[torch.Generator("cpu").manual_seed(seed + start + k) for k in range(batch_size)],
                )  # fmt: skip
    finally:
        handle.remove()
    return samples


def _replace_model(ov, model, path: Path) -> None:
    """Save ``model`` over ``path``: written aside, then renamed, because OpenVINO memory-maps
    the ``.bin`` it read, and writing into a mapped file kills the process (SIGBUS)."""
    import os

    aside = path.with_name(path.stem + ".new.xml")
    ov.save_model(model, str(aside), compress_to_fp16=False)
    os.replace(aside.with_suffix(".bin"), path.with_suffix(".bin"))
    os.replace(aside, path)


def quantize_export(
    pipe, folder: Path, components: dict[str, Any], settings, width: int, height: int
) -> dict[str, Any]:
    """Quantize the OpenVINO models in ``folder`` in place; returns what the manifest records about it."""
    try:
        import nncf
    except ImportError:
        raise MissingDependencyError("nncf", "deploy", "int8 quantization") from None
    ov = import_openvino()
    from distilsd.deploy.quantize import DEFAULT_CALIBRATION_PROMPTS

    started = time.perf_counter()
    prompts = list(settings.calibration_prompts or DEFAULT_CALIBRATION_PROMPTS)
    samples = collect_unet_inputs(
        pipe, prompts, settings.batch_size, settings.calibration_steps, width, height
    )
    if not settings.guidance and pipe.unet.config.get("time_cond_proj_dim") is None:
        # The export's U-Net batch has no guidance copy: keep the conditional half of each call.
        samples = [{k: v[v.shape[0] // 2 :] for k, v in s.items()} for s in samples]
    calibration_seconds = time.perf_counter() - started

    core = ov.Core()
    unet_file = folder / components["unet"]["model_file"]
    quantized = nncf.quantize(
        core.read_model(str(unet_file)),
        nncf.Dataset(samples),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(samples),
        # Quick calibration (tests, previews): no SmoothQuant and no bias correction, which
        # take most of the quantization time and improve quality.
        fast_bias_correction=True,
        advanced_parameters=nncf.AdvancedQuantizationParameters(
            disable_bias_correction=True,
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(convolution=-1, matmul=-1),
        )
        if settings.quick_calibration
        else None,
    )
    _replace_model(ov, quantized, unet_file)
    del quantized
    for name in ("text_encoder", "vae_decoder", "vae_encoder"):
        if name not in components:
            continue
        model_file = folder / components[name]["model_file"]
        compressed = nncf.compress_weights(
            core.read_model(str(model_file)), mode=nncf.CompressWeightsMode.INT8_ASYM
        )
        _replace_model(ov, compressed, model_file)
        del compressed
    return {
        "unet": "nncf.quantize (weights + activations, ModelType.TRANSFORMER)",
        "text_encoder_vae": "nncf.compress_weights (int8 weights only)",
        "prompts": prompts,
        "steps_per_prompt": settings.calibration_steps,
        "unet_samples": len(samples),
        "quick": settings.quick_calibration,
        "calibration_seconds": round(calibration_seconds, 2),
        "quantization_seconds": round(time.perf_counter() - started - calibration_seconds, 2),
    }
