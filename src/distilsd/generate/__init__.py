"""Generate images with any SD 1.x/2.x model (the ``distilsd generate`` command).

    from distilsd.generate import generate

    records = generate(["a red circle"], model="path/to/pipeline", output_dir="out", scheduler="dpm++", seed=1)

or, step by step (load once, generate many times)::

    from distilsd.generate import GenerationSettings, PromptSpec, generate_images, load_pipeline, plan_jobs

    loaded = load_pipeline("path/to/pipeline", unet="path/to/student-unet", scheduler="euler")
    settings = GenerationSettings(num_inference_steps=25, guidance_scale=7.5, seed=1234)
    jobs = plan_jobs([PromptSpec("a red circle")], settings)
    records = generate_images(loaded, jobs, settings, "out")
"""

from __future__ import annotations

from pathlib import Path

from distilsd.generate.core import (
    GenerationSettings,
    ImageJob,
    ImageRecord,
    check_output_dir,
    generate_images,
    plan_jobs,
    prepare_init_images,
    records_to_json,
)
from distilsd.generate.loading import load_pipeline
from distilsd.generate.metadata import a1111_parameters, parse_a1111_parameters, read_png_parameters
from distilsd.generate.prompts import PromptSpec, read_prompt_file
from distilsd.models import BUILTIN_MODELS, DEFAULT_MODEL, LoadedPipeline, default_guidance, load_unet
from distilsd.schedulers import (
    DEFAULT_SCHEDULER,
    SCHEDULERS,
    apply_few_step_defaults,
    few_step_defaults,
    make_scheduler,
)

DEFAULT_STEPS = 25  # denoising steps unless the model is an LCM (see few_step_defaults)

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "DEFAULT_SCHEDULER",
    "SCHEDULERS",
    "GenerationSettings",
    "ImageJob",
    "ImageRecord",
    "LoadedPipeline",
    "PromptSpec",
    "a1111_parameters",
    "check_output_dir",
    "default_guidance",
    "generate",
    "generate_images",
    "load_pipeline",
    "load_unet",
    "make_scheduler",
    "parse_a1111_parameters",
    "plan_jobs",
    "prepare_init_images",
    "read_png_parameters",
    "read_prompt_file",
    "records_to_json",
]


def generate(
    prompts: list[str | PromptSpec],
    *,
    model: str,
    output_dir: str | Path,
    unet: str | None = None,
    scheduler: str | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    negative_prompt: str = "",
    seed: int = 0,
    num_images_per_prompt: int = 1,
    batch_size: int = 1,
    height: int | None = None,
    width: int | None = None,
    init_image: str | Path | None = None,
    mask: str | Path | None = None,
    strength: float = 0.8,
    dtype: str = "fp32",
    device: str = "auto",
    allow_pickle: bool = False,
    config: str | None = None,
    safety_checker: bool = True,
    attention_slicing: bool = False,
    vae_slicing: bool = False,
    vae_tiling: bool = False,
    channels_last: bool = False,
    backend: str = "pytorch",
    precision: str = "auto",
    vae: str | None = None,
    deepcache: int | None = None,
    tome: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
    loras: list | tuple = (),
    fuse_lora: bool = False,
    lora_skip_unknown: bool = False,
) -> list[ImageRecord]:
    """Load ``model`` and write one PNG per prompt and image into ``output_dir``.

    Everything is validated before weights are loaded. With ``init_image`` the run is
    image-to-image, and with ``mask`` too it is inpainting, on the same model.
    ``loras``: ``"PATH[:SCALE]"`` LoRA files mixed into the model (``fuse_lora`` folds them in).
    ``backend="openvino"|"onnx"`` runs exported components (``precision``: fp32, bf16, int8, or
    ``auto``: bf16 where the CPU runs it natively, else fp32); ``vae`` (a tiny VAE folder or
    ``"tiny"``), ``deepcache`` and ``tome`` speed up PyTorch runs (see :func:`load_pipeline`).
    ``num_inference_steps`` and ``guidance_scale`` default to 25 and the model's guidance, or to
    what an LCM model (or LCM-LoRA) was distilled for (4 LCM steps); another ``scheduler`` on an
    LCM model is warned about.
    """
    specs = [p if isinstance(p, PromptSpec) else PromptSpec(p) for p in prompts]
    if not specs or any(not spec.prompt.strip() for spec in specs):
        from distilsd.errors import InputError

        raise InputError("no prompt given (or an empty one)", hint="give at least one non-empty prompt")
    num_inference_steps, guidance_scale, scheduler = apply_few_step_defaults(
        few_step_defaults(model, loras), num_inference_steps, guidance_scale, scheduler
    )
    settings = GenerationSettings(
        num_inference_steps=DEFAULT_STEPS if num_inference_steps is None else num_inference_steps,
        guidance_scale=default_guidance(model) if guidance_scale is None else guidance_scale,
        height=height,
        width=width,
        negative_prompt=negative_prompt,
        seed=seed,
        num_images_per_prompt=num_images_per_prompt,
        batch_size=batch_size,
        strength=strength,
    )
    settings.validate()
    init, mask_image = prepare_init_images(settings, init_image, mask)
    check_output_dir(Path(output_dir))
    task = "text2image" if init is None else ("inpaint" if mask_image is not None else "image2image")
    loaded = load_pipeline(
        model,
        unet=unet,
        task=task,
        scheduler=scheduler,
        dtype=dtype,
        device=device,
        allow_pickle=allow_pickle,
        config=config,
        safety_checker=safety_checker,
        attention_slicing=attention_slicing,
        vae_slicing=vae_slicing,
        vae_tiling=vae_tiling,
        channels_last=channels_last,
        backend=backend,
        precision=precision,
        width=settings.width,
        height=settings.height,
        batch_size=settings.batch_size,
        loras=loras,
        fuse_lora=fuse_lora,
        lora_skip_unknown=lora_skip_unknown,
        vae=vae,
        deepcache=deepcache,
        tome=tome,
    )
    jobs = plan_jobs(specs, settings)
    return generate_images(
        loaded,
        jobs,
        settings,
        output_dir,
        init_image=init,
        mask_image=mask_image,
        overwrite=overwrite,
        progress=progress,
    )
