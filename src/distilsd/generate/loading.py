"""Loading any SD 1.x/2.x model into a diffusers pipeline, safely.

A model can be:
- a local diffusers pipeline folder (has ``model_index.json``);
- a single-file checkpoint: ``.safetensors``, or a pickle (``.ckpt``/``.bin``/``.pt``/``.pth``)
  which is refused unless ``allow_pickle=True``, since unpickling can run code;
- a Hugging Face hub id (``owner/name``), fetched when online;
- a built-in name (see :data:`BUILTIN_MODELS`).

``unet`` swaps another U-Net in (a U-Net folder, a pipeline folder whose ``unet/`` is used,
or a hub id): the BK-SDM way of running a compressed U-Net on a base pipeline.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distilsd.errors import InputError, ModelLoadError, UnsafeCheckpointError

logger = logging.getLogger("distilsd")

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
SINGLE_FILE_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
DTYPES = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
TASKS = ("text2image", "image2image", "inpaint")
BACKENDS = ("pytorch", "openvino", "onnx")
PRECISIONS = ("f32", "bf16", "int8")  # of exported backends; PyTorch uses --dtype


def _is_exported_folder(model: str) -> bool:
    # An export without its manifest is still routed to the export loader, which refuses it.
    from distilsd.deploy.runtime import looks_like_export

    return Path(model).is_dir() and looks_like_export(model)


def _cache_dir() -> Path:
    return Path(os.environ.get("DISTILSD_CACHE", Path.home() / ".cache" / "distilsd"))


def _tiny_random_pipeline() -> Path:
    """A tiny random-weight SD pipeline, built once into the cache (for demos and smoke tests)."""
    from distilsd.testing import save_tiny_pipeline

    path = _cache_dir() / "models" / "tiny-random"
    if not (path / "model_index.json").exists():
        tmp = path.with_name(path.name + ".tmp")
        save_tiny_pipeline(tmp)
        tmp.rename(path)
    return path


def _shapes_pipeline(name: str):
    def assemble() -> Path:
        from distilsd.shapes.model import builtin_pipeline

        return builtin_pipeline(name)

    return assemble


# name -> (function returning a local pipeline folder, description)
BUILTIN_MODELS: dict[str, tuple[Any, str]] = {
    "shapes-tiny": (
        _shapes_pipeline("shapes-tiny"),
        "the Shapes model's bk-tiny student, distilled from 'shapes' by distilsd (64 px, the default)",
    ),
    "shapes": (
        _shapes_pipeline("shapes"),
        "the Shapes model: a 64 px SD-topology teacher trained from scratch by distilsd",
    ),
    "tiny-random": (
        _tiny_random_pipeline,
        "a few-MB SD-topology pipeline with random weights (images are noise)",
    ),
}


# The model used when none is named: the built-in Shapes student, shipped inside the package.
DEFAULT_MODEL = "shapes-tiny"

# Classifier-free guidance when none is asked for: SD's 7.5, except for the built-in Shapes
# models, whose zero-SNR v-prediction samples oversaturate above ~5 (README, "The Shapes world").
DEFAULT_GUIDANCE = 7.5
BUILTIN_GUIDANCE = {"shapes": 4.5, "shapes-tiny": 4.5}


def default_guidance(model: str) -> float:
    """The guidance scale ``model`` (a name or path as the user gave it) samples with by default."""
    return BUILTIN_GUIDANCE.get(model, DEFAULT_GUIDANCE)


@dataclass
class LoadedPipeline:
    """A diffusers pipeline and what distilsd needs to know about where it came from."""

    pipeline: Any  # diffusers StableDiffusionPipeline / Img2Img / Inpaint
    name: str  # short model name written into image metadata
    source: str  # what the user asked for (path, hub id, builtin name)
    unet_source: str | None
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    static_size: tuple[int, int] | None = None  # (width, height) of a static-shape export

    @property
    def native_resolution(self) -> int:
        """The image size the U-Net was built for (``sample_size`` x VAE scale)."""
        pipe = self.pipeline
        return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)

    @property
    def default_size(self) -> tuple[int, int]:
        """(width, height) used when none is asked for: the export's static size, else the native one."""
        return self.static_size or (self.native_resolution, self.native_resolution)


def resolve_device(device: str = "auto"):
    import torch

    if device not in DEVICES:
        raise InputError(f"unknown device '{device}'", hint="use one of: " + ", ".join(DEVICES))
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(
            "--device cuda was asked for but no CUDA GPU is available", hint="use --device cpu or auto"
        )
    if device == "mps" and not torch.backends.mps.is_available():
        raise InputError(
            "--device mps was asked for but Apple MPS is not available", hint="use --device cpu or auto"
        )
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); True when it cannot be told."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device) -> Any:
    """Map ``fp32|bf16|fp16`` to a torch dtype, refusing one the device cannot run well."""
    import torch

    if dtype not in DTYPES:
        raise InputError(f"unknown dtype '{dtype}'", hint="use one of: " + ", ".join(DTYPES))
    if dtype == "fp32":
        return torch.float32
    if dtype == "fp16":
        if device.type == "cpu":
            raise InputError(
                "fp16 is not supported on the CPU (many ops are missing or very slow)",
                hint="use --dtype bf16 or fp32 on the CPU",
            )
        return torch.float16
    # bf16
    if device.type == "cpu" and not cpu_has_native_bf16():
        # Emulated bf16 convolutions can be orders of magnitude slower than fp32.
        logger.warning(
            "warning: this CPU has no native bf16 (AVX-512 BF16 / AMX); bf16 is emulated and can be far slower than fp32"
        )
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError("this GPU does not support bf16", hint="use --dtype fp16 or fp32")
    return torch.bfloat16


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def _check_pickle(path: Path, allow_pickle: bool) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{path} is a pickled checkpoint, and loading a pickle can run arbitrary code",
            hint="convert it to .safetensors, or pass --allow-pickle if you trust its source",
        )


def _folder_has_only_pickled_weights(folder: Path) -> bool:
    weights = [p for p in folder.rglob("*") if p.suffix in (".bin", ".safetensors", ".ckpt", ".pt", ".pth")]
    return bool(weights) and not any(p.suffix == ".safetensors" for p in weights)


def _hub_error(source: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load '{source}' from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
        hint="check the id and your network, or give a local folder or .safetensors file",
    )


def _load_base_pipeline(model: str, *, allow_pickle: bool, config: str | None, torch_dtype) -> Any:
    from diffusers import StableDiffusionPipeline

    if model in BUILTIN_MODELS:
        model = str(BUILTIN_MODELS[model][0]())
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            hint = (
                "a U-Net folder goes in --unet"
                if (path / "config.json").exists()
                else "give a diffusers pipeline folder, a .safetensors file or a hub id"
            )
            raise ModelLoadError(
                f"{path} is not a diffusers pipeline folder (no model_index.json)", hint=hint
            )
        if _folder_has_only_pickled_weights(path) and not allow_pickle:
            raise UnsafeCheckpointError(
                f"{path} holds only pickled weights (.bin), and loading a pickle can run arbitrary code",
                hint="re-save it with safetensors, or pass --allow-pickle if you trust its source",
            )
        try:
            return StableDiffusionPipeline.from_pretrained(
                path, dtype=torch_dtype, use_safetensors=not allow_pickle
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"could not load the pipeline in {path}: {str(exc).splitlines()[0][:300]}"
            ) from exc
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(
                f"{path} is not a checkpoint file", hint="expected " + ", ".join(SINGLE_FILE_SUFFIXES)
            )
        _check_pickle(path, allow_pickle)
        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if config:
            kwargs.update(config=config, local_files_only=Path(config).is_dir())
        try:
            return StableDiffusionPipeline.from_single_file(str(path), **kwargs)
        except Exception as exc:  # diffusers raises many types here (hub, key, shape errors)
            raise ModelLoadError(
                f"could not load the single-file checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                hint="pass --config with a local diffusers folder of the same model family when offline",
            ) from exc
    if _looks_like_hub_id(model):
        try:
            return StableDiffusionPipeline.from_pretrained(
                model, dtype=torch_dtype, use_safetensors=not allow_pickle
            )
        except Exception as exc:
            raise _hub_error(model, exc) from exc
    raise ModelLoadError(
        f"model '{model}' does not exist",
        hint="give a diffusers pipeline folder, a .safetensors file, a hub id (owner/name) or a built-in name: "
        + ", ".join(BUILTIN_MODELS),
    )


def load_unet(source: str, *, allow_pickle: bool = False, torch_dtype=None):
    """Load a UNet2DConditionModel from a U-Net folder, a pipeline folder (its ``unet/``) or a hub id."""
    from diffusers import UNet2DConditionModel

    path = Path(source).expanduser()
    subfolder = None
    if path.is_dir():
        if (path / "model_index.json").exists():
            subfolder = "unet"
        elif not (path / "config.json").exists():
            raise ModelLoadError(
                f"{path} is neither a U-Net folder (config.json) nor a pipeline folder (model_index.json)"
            )
        target = path / subfolder if subfolder else path
        if _folder_has_only_pickled_weights(target) and not allow_pickle:
            raise UnsafeCheckpointError(
                f"the U-Net in {target} has only pickled weights (.bin)",
                hint="re-save it with safetensors, or pass --allow-pickle",
            )
        try:
            return UNet2DConditionModel.from_pretrained(
                path, subfolder=subfolder, dtype=torch_dtype, use_safetensors=not allow_pickle
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"could not load the U-Net in {path}: {str(exc).splitlines()[0][:300]}"
            ) from exc
    if path.is_file():
        raise ModelLoadError(
            f"--unet {path} is a file", hint="give a U-Net folder in diffusers format (config.json + weights)"
        )
    if _looks_like_hub_id(source):
        try:
            return UNet2DConditionModel.from_pretrained(
                source, subfolder="unet", dtype=torch_dtype, use_safetensors=not allow_pickle
            )
        except Exception as exc:
            raise _hub_error(source, exc) from exc
    raise ModelLoadError(
        f"U-Net '{source}' does not exist", hint="give a U-Net folder, a pipeline folder or a hub id"
    )


def check_unet_fits(unet, text_encoder) -> None:
    """Refuse a U-Net whose cross-attention width differs from the text encoder's output."""
    cross = unet.config.cross_attention_dim
    hidden = text_encoder.config.hidden_size
    if cross != hidden:
        raise ModelLoadError(
            f"the U-Net's cross_attention_dim is {cross} but the text encoder produces {hidden}-wide embeddings",
            hint="pair SD v1 U-Nets (768) with SD v1 base models and SD v2 U-Nets (1024) with SD v2 ones",
        )


def model_display_name(source: str) -> str:
    if source in BUILTIN_MODELS:
        return source
    path = Path(source)
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return source  # hub id


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
    precision: str = "f32",
    width: int | None = None,
    height: int | None = None,
    batch_size: int = 1,
) -> LoadedPipeline:
    """Load ``model`` (optionally with another ``unet``) as a diffusers pipeline for ``task``.

    ``backend="openvino"|"onnx"`` exports the model on the fly (cached by model, size,
    batch and ``precision``) and runs the exported components under the same diffusers
    pipeline; an exported folder given as ``model`` is loaded as such. ``width``, ``height``
    and ``batch_size`` fix the static shapes of such an export.

    ``scheduler`` is a short name from :data:`distilsd.generate.schedulers.SCHEDULERS`
    (default: the model's own). The safety checker runs when the model has one, unless
    ``safety_checker=False``.
    """
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    from distilsd.generate.schedulers import make_scheduler, scheduler_spec

    if task not in TASKS:
        raise InputError(f"unknown task '{task}'", hint="use one of: " + ", ".join(TASKS))
    if scheduler is not None:
        scheduler_spec(scheduler)  # validate the name before loading any weights
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}'", hint="use one of: " + ", ".join(BACKENDS))
    if backend != "pytorch" or _is_exported_folder(model):
        # OpenVINO / ONNX Runtime components under a stock diffusers pipeline (distilsd.deploy).
        from distilsd.deploy import exported_pipeline_for, load_exported_pipeline

        folder = model
        if not _is_exported_folder(model):
            folder = exported_pipeline_for(
                model,
                backend,
                width,
                height,
                batch_size,
                precision,
                unet=unet,
                allow_pickle=allow_pickle,
                config=config,
            )
        return load_exported_pipeline(
            folder, task=task, scheduler=scheduler, width=width, height=height, source=model
        )
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)

    pipe = _load_base_pipeline(model, allow_pickle=allow_pickle, config=config, torch_dtype=torch_dtype)
    if unet is not None:
        swapped = load_unet(unet, allow_pickle=allow_pickle, torch_dtype=torch_dtype)
        check_unet_fits(swapped, pipe.text_encoder)
        pipe.unet = swapped
        pipe.register_modules(unet=swapped)
    else:
        check_unet_fits(pipe.unet, pipe.text_encoder)

    if not safety_checker and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
        pipe.register_to_config(requires_safety_checker=False)
        pipe.register_modules(safety_checker=None)
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)

    if task == "image2image":
        pipe = StableDiffusionImg2ImgPipeline(**pipe.components)
    elif task == "inpaint":
        pipe = StableDiffusionInpaintPipeline(**pipe.components)

    pipe = pipe.to(torch_device)
    if attention_slicing:
        pipe.enable_attention_slicing()
    if vae_slicing:
        pipe.vae.enable_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)

    return LoadedPipeline(
        pipeline=pipe,
        name=model_display_name(model) + (f"+unet:{model_display_name(unet)}" if unet else ""),
        source=model,
        unet_source=unet,
        device=torch_device,
        dtype=torch_dtype,
    )
