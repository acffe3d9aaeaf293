"""``load_pipeline``: the one dispatcher between PyTorch and the exported runtimes.

What a model name means, and loading it with PyTorch, live in :mod:`distilsd.models`;
exporting and running OpenVINO / ONNX components live in :mod:`distilsd.deploy`. This module
picks one of the two and applies the options that change how a pipeline runs (scheduler,
attention and VAE slicing, memory format).
"""

from __future__ import annotations

from pathlib import Path

from distilsd.errors import InputError
from distilsd.models import LoadedPipeline, load_torch_pipeline, normalize_precision

BACKENDS = ("pytorch", "openvino", "onnx")


def _is_exported_folder(model: str) -> bool:
    # An export without its manifest is still routed to the export loader, which refuses it.
    from distilsd.deploy.runtime import looks_like_export

    return Path(model).is_dir() and looks_like_export(model)


def load_pipeline(
    model: str,
    *,
    unet: str | None = None,
    task: str = "text2image",
    scheduler: str | None = None,
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
    width: int | None = None,
    height: int | None = None,
    batch_size: int = 1,
    loras: list | tuple = (),
    fuse_lora: bool = False,
    lora_skip_unknown: bool = False,
    vae: str | None = None,
    deepcache: int | None = None,
    tome: float | None = None,
) -> LoadedPipeline:
    """Load ``model`` (optionally with another ``unet``) as a diffusers pipeline for ``task``.

    ``model`` is any name :mod:`distilsd.models` resolves. ``backend="openvino"|"onnx"``
    exports the model on the fly (cached by model, size, batch and ``precision``) and runs the
    exported components under the same diffusers pipeline; an exported folder given as
    ``model`` is loaded as such. ``width``, ``height`` and ``batch_size`` fix the static shapes
    of such an export.

    ``scheduler`` is a short name from :data:`distilsd.schedulers.SCHEDULERS` (default: the
    model's own). The safety checker runs when the model has one, unless ``safety_checker=False``.

    ``loras`` (``"PATH[:SCALE]"`` strings or :class:`distilsd.lora.LoRASpec`) are loaded as
    diffusers adapters and mixed by their scales; ``fuse_lora`` folds them into the weights.
    Speed-ups (PyTorch backend, docs/fast.md): ``vae`` swaps in a tiny VAE (a folder, or
    ``"tiny"`` for the model's own ``tiny_vae/``); ``deepcache=N`` reuses the U-Net's deep
    features on N-1 of every N U-Net calls; ``tome=R`` merges R of the tokens before the
    highest-resolution self-attention (token merging, :mod:`distilsd.token_merging`).
    """
    import torch

    from distilsd.models import TASKS
    from distilsd.schedulers import make_scheduler, scheduler_spec

    if task not in TASKS:
        raise InputError(f"unknown task '{task}'", hint="use one of: " + ", ".join(TASKS))
    if scheduler is not None:
        scheduler_spec(scheduler)  # validate the name before loading any weights
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}'", hint="use one of: " + ", ".join(BACKENDS))
    from distilsd.lora.files import LoRASpec, parse_lora_spec

    lora_specs = [spec if isinstance(spec, LoRASpec) else parse_lora_spec(str(spec)) for spec in loras]
    if lora_specs and (backend != "pytorch" or _is_exported_folder(model)):
        raise InputError(
            "--lora runs on the PyTorch backend; an exported model has fixed weights",
            hint="fuse the LoRA into an export: distilsd export MODEL --lora PATH[:SCALE]",
        )
    if deepcache is not None and deepcache < 1:
        raise InputError(
            f"--deepcache must be at least 1 (got {deepcache})", hint="1 turns it off; 2-5 is usual"
        )
    if _is_exported_folder(model) and vae is not None:
        raise InputError(
            "--vae cannot change an exported model's decoder (its components are fixed)",
            hint="export with the tiny VAE: distilsd export MODEL --vae PATH|tiny, or generate from the pipeline folder with --backend openvino --vae ...",
        )
    if tome is not None:
        from distilsd.token_merging import check_ratio

        check_ratio(tome)
    if backend != "pytorch" or _is_exported_folder(model):
        for flag, value in (("--deepcache", deepcache), ("--tome", tome)):
            if value is not None:
                raise InputError(
                    f"{flag} works with the PyTorch backend only",
                    hint="drop it, or use --backend pytorch with a pipeline (not exported) model",
                )
        # OpenVINO / ONNX Runtime components under a stock diffusers pipeline (distilsd.deploy).
        from distilsd.deploy import exported_pipeline_for, load_exported_pipeline
        from distilsd.deploy.runtime import PRECISIONS, auto_precision

        folder = model
        if not _is_exported_folder(model):
            if precision == "auto":
                export_precision = auto_precision(backend)  # resolved before the cache key is made
            else:
                export_precision = normalize_precision(precision, PRECISIONS, "precision")
            folder = exported_pipeline_for(
                model,
                backend,
                width,
                height,
                batch_size,
                export_precision,
                unet=unet,
                allow_pickle=allow_pickle,
                config=config,
                vae=vae,  # the tiny VAE is exported in place of the model's
            )
        return load_exported_pipeline(
            folder, task=task, scheduler=scheduler, width=width, height=height, source=model
        )

    loaded = load_torch_pipeline(
        model,
        unet=unet,
        task=task,
        dtype=dtype,
        device=device,
        allow_pickle=allow_pickle,
        config=config,
        safety_checker=safety_checker,
        vae=vae,
    )
    pipe = loaded.pipeline
    if lora_specs:
        from distilsd.lora.files import apply_loras

        names = apply_loras(
            pipe, lora_specs, fuse=fuse_lora, allow_pickle=allow_pickle, skip_unknown=lora_skip_unknown
        )
        loaded.name += "".join(f"+lora:{name}:{spec.scale:g}" for name, spec in zip(names, lora_specs))
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    if attention_slicing:
        pipe.enable_attention_slicing()
    if vae_slicing:
        pipe.vae.enable_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if deepcache is not None and deepcache > 1:
        from distilsd.deepcache import enable_deepcache

        enable_deepcache(pipe.unet, deepcache)
        # Part of the name written into image metadata: cached steps give other images.
        loaded.name += f"+deepcache:{deepcache}"
    if tome:
        from distilsd.token_merging import enable_token_merging

        enable_token_merging(pipe.unet, tome)
        loaded.name += f"+tome:{tome:g}"  # merged tokens give other images: part of the metadata
    return loaded
