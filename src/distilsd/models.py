"""One home for model names: what a name given by a user means, and loading it with PyTorch.

A model name can be:

- a built-in name (:data:`BUILTIN_MODELS`: ``shapes-tiny``, the default, ``shapes``,
  ``shapes-tiny-lcm``, ``tiny-random``);
- an architecture with random weights (:func:`parse_architecture`): ``sd-v1``, ``sd-v2``, a student
  of one (``sd-v1:bk-tiny``), or a student layout alone (``bk-tiny`` means ``sd-v1:bk-tiny``);
- a local diffusers pipeline folder (has ``model_index.json``), or an exported one (OpenVINO /
  ONNX, loaded by :mod:`distilsd.deploy`);
- a single-file checkpoint: ``.safetensors``, or a pickle (``.ckpt``/``.bin``/``.pt``/``.pth``)
  that is refused unless ``allow_pickle=True``, since unpickling can run code;
- a Hugging Face hub id (``owner/name``), fetched when online;
- ``BASE::UNET``: a base pipeline with another U-Net swapped in, the BK-SDM way of running a
  compressed U-Net (:func:`split_base_unet`; ``--unet`` says the same on the command line).

This module also owns the precision vocabulary (:data:`PRECISIONS`, one spelling at every user
surface), devices, the cache root, and :func:`load_torch_pipeline`. It sits below
:mod:`distilsd.generate` and :mod:`distilsd.deploy` and imports neither:
``distilsd.generate.load_pipeline`` is the one dispatcher between PyTorch and exported runtimes.
Heavy libraries are imported inside functions, so ``distilsd --help`` stays fast.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distilsd.compress.teacher import ARCHITECTURE_PRESETS, load_preset, preset_scheduler
from distilsd.errors import InputError, ModelLoadError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- precisions, devices

# The one precision vocabulary of the user surface (CLI, API, configs, export manifests).
# PyTorch runs fp32/bf16/fp16; exported runtimes run fp32/bf16/int8.
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
DTYPES = ("fp32", "bf16", "fp16")  # PyTorch weights and compute
DEVICES = ("auto", "cpu", "cuda", "mps")

# Older spellings, still accepted with a deprecation warning: exports said f32, the latent
# cache float32/float16/bfloat16, accelerate's mixed precision "no".
OLD_PRECISION_SPELLINGS = {
    "f32": "fp32",
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "no": "fp32",
}


def normalize_precision(value: str, allowed: tuple[str, ...] = PRECISIONS, what: str = "precision") -> str:
    """``value`` in the one vocabulary: old spellings map to new ones (with a warning); others are refused."""
    text = str(value).strip().lower()
    if text in OLD_PRECISION_SPELLINGS and OLD_PRECISION_SPELLINGS[text] in allowed:
        new = OLD_PRECISION_SPELLINGS[text]
        warnings.warn(f"{what} '{value}' is deprecated; say '{new}'", DeprecationWarning, stacklevel=2)
        logger.warning("%s '%s' is deprecated; say '%s'", what, value, new)
        return new
    if text not in allowed:
        raise InputError(f"unknown {what} '{value}'", hint="use one of: " + ", ".join(allowed))
    return text


def torch_dtype(precision: str):
    """The torch dtype of ``fp32|bf16|fp16`` (the only str -> dtype map in distilsd)."""
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    precision = normalize_precision(precision, DTYPES, "dtype")
    return dtypes[precision]


def precision_name(dtype) -> str:
    """``fp32|bf16|fp16`` for a torch dtype (the inverse of :func:`torch_dtype`)."""
    import torch

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    if dtype not in names:
        raise InputError(f"unsupported dtype {dtype}", hint="use one of: " + ", ".join(DTYPES))
    return names[dtype]


def resolve_device(device: str = "auto"):
    """A torch device for ``auto|cpu|cuda|mps``, refusing one that is not there."""
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
    """The torch dtype of ``fp32|bf16|fp16``, refusing one the device cannot run well."""
    import torch

    dtype = normalize_precision(dtype, DTYPES, "dtype")
    if dtype == "fp16" and device.type == "cpu":
        raise InputError(
            "fp16 is not supported on the CPU (many ops are missing or very slow)",
            hint="use --dtype bf16 or fp32 on the CPU",
        )
    if dtype == "bf16":
        if device.type == "cpu" and not cpu_has_native_bf16():
            # Emulated bf16 convolutions can be orders of magnitude slower than fp32.
            logger.warning(
                "this CPU has no native bf16 (AVX-512 BF16 / AMX); bf16 is emulated and can be far slower than fp32"
            )
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise InputError("this GPU does not support bf16", hint="use --dtype fp16 or fp32")
    return torch_dtype(dtype)


# --------------------------------------------------------------------------- the cache


def cache_root() -> Path:
    """``$DISTILSD_CACHE`` (default ``~/.cache/distilsd``): ``models/``, ``exports/`` and ``latents/`` live under it."""
    return Path(os.environ.get("DISTILSD_CACHE") or Path.home() / ".cache" / "distilsd")


def cache_dir(kind: str) -> Path:
    """One part of the cache: ``models`` (assembled built-ins), ``exports`` or ``latents``."""
    if kind not in ("models", "exports", "latents"):
        raise ValueError(kind)
    return cache_root() / kind


# --------------------------------------------------------------------------- architectures

# Architecture presets (shipped configs, random weights) are compress's data: its presets folder.
ARCHITECTURES = ARCHITECTURE_PRESETS


def parse_architecture(name: str) -> tuple[str, str | None] | None:
    """``(architecture, student layout or None)`` for an architecture name, else None.

    ``sd-v1``, ``sd-v2``, ``sd-v1:bk-tiny``, and a layout alone (``bk-tiny`` = ``sd-v1:bk-tiny``).
    A name that exists on disk is a path, never an architecture.
    """
    from distilsd.compress.layouts import normalize_preset_name

    text = name.strip()
    if Path(text).exists():
        return None
    base, _, layout = text.partition(":")
    if base in ARCHITECTURES:
        if not layout:
            return base, None
        if normalize_preset_name(layout) is None:
            raise InputError(
                f"unknown student layout '{layout}' in '{name}'", hint="use bk-base, bk-small or bk-tiny"
            )
        return base, normalize_preset_name(layout)
    if not layout and normalize_preset_name(text) is not None:
        return "sd-v1", normalize_preset_name(text)
    return None


def is_architecture_name(name: str) -> bool:
    try:
        return parse_architecture(name) is not None
    except InputError:
        return True  # an architecture with a bad layout: refused where it is built


def architecture_configs(name: str) -> dict[str, dict[str, Any]]:
    """U-Net, text encoder, VAE and scheduler configs of an architecture name (no weights)."""
    from distilsd.compress import get_layout, student_config

    parsed = parse_architecture(name)
    if parsed is None:
        raise InputError(f"'{name}' is not an architecture name", hint="use " + ", ".join(ARCHITECTURES))
    base, layout = parsed
    preset = load_preset(base)
    unet_config = dict(preset["unet"])
    if layout:
        unet_config = student_config(unet_config, get_layout(layout, unet_config))
    text_config = {
        k: v
        for k, v in preset["text_encoder"].items()
        if k not in ("architectures", "model_type", "torch_dtype", "dtype")
    }
    return {
        "unet": unet_config,
        "text_encoder": text_config,
        "vae": preset["vae"],
        "scheduler": preset["scheduler"],
    }


def random_pipeline(name: str, *, text_encoder: bool = True, vae: bool = True, seed: int = 0):
    """A diffusers SD pipeline with random weights (fixed seed) for an architecture name.

    Real shapes, so speed and memory are those of the real model. ``text_encoder=False`` or
    ``vae=False`` leave that component out (None), for benchmarks that do not need it.
    """
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from distilsd.assets import clip_tokenizer

    configs = architecture_configs(name)
    architecture = parse_architecture(name)[0]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(configs["unet"]).eval()
    encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])).eval() if text_encoder else None
    autoencoder = AutoencoderKL.from_config(configs["vae"]).eval() if vae else None
    return StableDiffusionPipeline(
        vae=autoencoder,
        text_encoder=encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=preset_scheduler(architecture),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# --------------------------------------------------------------------------- built-in models


def _tiny_random_pipeline() -> Path:
    """A tiny random-weight SD pipeline, built once into the cache (for demos and smoke tests)."""
    from distilsd.testing import save_tiny_pipeline

    path = cache_dir("models") / "tiny-random"
    if not (path / "model_index.json").exists():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_tiny_pipeline(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process built it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _shapes_pipeline(name: str) -> Callable[[], Path]:
    def assemble() -> Path:
        from distilsd.shapes.model import builtin_pipeline

        return builtin_pipeline(name, cache_dir("models"))

    return assemble


# name -> (function returning a local pipeline folder, description)
BUILTIN_MODELS: dict[str, tuple[Callable[[], Path], str]] = {
    "shapes-tiny": (
        _shapes_pipeline("shapes-tiny"),
        "the Shapes model's bk-tiny student, distilled from 'shapes' by distilsd (64 px, the default)",
    ),
    "shapes": (
        _shapes_pipeline("shapes"),
        "the Shapes model: a 64 px SD-topology teacher trained from scratch by distilsd",
    ),
    "shapes-tiny-lcm": (
        _shapes_pipeline("shapes-tiny-lcm"),
        "shapes-tiny distilled further into a latent consistency model (LCM): 1-8 steps, 4 by default",
    ),
    "tiny-random": (
        _tiny_random_pipeline,
        "a few-MB SD-topology pipeline with random weights (images are noise)",
    ),
}

# The model used when none is named: the built-in Shapes student, shipped inside the package.
DEFAULT_MODEL = "shapes-tiny"

# Classifier-free guidance when none is asked for: SD's 7.5, except for the built-in Shapes
# models, whose zero-SNR v-prediction samples oversaturate above ~5 (docs/shapes.md).
DEFAULT_GUIDANCE = 7.5
BUILTIN_GUIDANCE = {"shapes": 4.5, "shapes-tiny": 4.5, "shapes-tiny-lcm": 4.5}


# The manifest `distilsd export` writes last into an exported folder (deploy/export.py): named
# here, below deploy, because resolving a model's defaults reads it too.
EXPORT_MANIFEST_NAME = "distilsd-export.json"


def default_guidance(model: str) -> float:
    """The guidance scale ``model`` (a name or path as the user gave it) samples with by default.

    ``BASE::UNET`` samples like BASE, and an exported folder like the model it was exported from:
    an export of ``shapes-tiny`` (its manifest's ``source.model``) keeps the 4.5 that the Shapes
    models need.
    """
    base = model.partition(UNET_SEPARATOR)[0]  # not split_base_unet: a default neither warns nor refuses
    if base in BUILTIN_GUIDANCE:
        return BUILTIN_GUIDANCE[base]
    return BUILTIN_GUIDANCE.get(_exported_from(base) or "", DEFAULT_GUIDANCE)


def _exported_from(model: str) -> str | None:
    """The ``source.model`` an export folder's manifest names; None for anything else.

    Read here without checking the export's files (``deploy.runtime.read_manifest`` does that
    when the folder is loaded): a default must not fail where loading will explain the problem.
    """
    import json

    try:
        manifest = json.loads((Path(model).expanduser() / EXPORT_MANIFEST_NAME).read_text(encoding="utf-8"))
        source = manifest["source"]["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return source if isinstance(source, str) else None


def builtin_folder(name: str) -> Path:
    """The local pipeline folder of a built-in model (assembled into the cache on first use)."""
    return Path(BUILTIN_MODELS[name][0]())


def native_resolution(model: str) -> int:
    """The image side ``model`` (a built-in name or pipeline folder) was trained at: U-Net sample
    size x the VAE's downsampling; 512 (SD 1.x's) where its configs cannot be read (a hub id)."""
    import json

    folder = builtin_folder(model) if model in BUILTIN_MODELS else Path(model)
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return 512


# --------------------------------------------------------------------------- base + U-Net

UNET_SEPARATOR = "::"  # BASE::UNET: BASE's pipeline with UNET's U-Net swapped in
_OLD_UNET_SEPARATORS = ("+",)  # `eval sweep` said PIPELINE+UNET


def split_base_unet(text: str) -> tuple[str, str | None]:
    """``(base, unet)`` of ``BASE::UNET`` (``(text, None)`` without a U-Net).

    The older ``BASE+UNET`` is still read, with a deprecation warning, unless ``text`` is a
    path that exists as given.
    """
    old_separator = None
    if UNET_SEPARATOR in text:
        base, _, unet = text.partition(UNET_SEPARATOR)
    else:
        base, unet = text, ""
        for separator in _OLD_UNET_SEPARATORS:
            if separator in text and not Path(text).exists():
                base, _, unet = text.partition(separator)
                old_separator = separator
                break
    split = UNET_SEPARATOR in text or old_separator is not None
    if not base or (split and not unet):
        raise InputError(
            f"model '{text}' is not PIPELINE or PIPELINE{UNET_SEPARATOR}UNET",
            hint="name a model on both sides of '::' (a base pipeline and the U-Net to swap in)",
        )
    if old_separator is not None:
        message = f"'{text}': BASE{old_separator}UNET is deprecated; say BASE{UNET_SEPARATOR}UNET"
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        logger.warning(message)
    return base, (unet or None)


# --------------------------------------------------------------------------- loading (PyTorch)

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
SINGLE_FILE_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
TASKS = ("text2image", "image2image", "inpaint")


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


def looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def check_pickle(path: Path, allow_pickle: bool) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{path} is a pickled checkpoint, and loading a pickle can run arbitrary code",
            hint="convert it to .safetensors, or pass --allow-pickle if you trust its source",
        )


def folder_has_only_pickled_weights(folder: Path) -> bool:
    weights = [p for p in folder.rglob("*") if p.suffix in (".bin", ".safetensors", ".ckpt", ".pt", ".pth")]
    return bool(weights) and not any(p.suffix == ".safetensors" for p in weights)


def _hub_error(source: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load '{source}' from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
        hint="check the id and your network, or give a local folder or .safetensors file",
    )


def load_base_pipeline(
    model: str, *, allow_pickle: bool = False, config: str | None = None, torch_dtype=None
):
    """A text-to-image StableDiffusionPipeline for a built-in name, folder, single file or hub id."""
    from diffusers import StableDiffusionPipeline

    check_model_source(model, allow_pickle=allow_pickle)
    if model in BUILTIN_MODELS:
        model = str(builtin_folder(model))
    path = Path(model).expanduser()
    if path.is_dir():
        try:
            return StableDiffusionPipeline.from_pretrained(
                path, dtype=torch_dtype, use_safetensors=not allow_pickle
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"could not load the pipeline in {path}: {str(exc).splitlines()[0][:300]}"
            ) from exc
    if path.is_file():
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
    try:  # a hub id: check_model_source refused anything else
        return StableDiffusionPipeline.from_pretrained(
            model, dtype=torch_dtype, use_safetensors=not allow_pickle
        )
    except Exception as exc:
        raise _hub_error(model, exc) from exc


def _check_safetensors_file(path: Path) -> None:
    """Refuse a truncated or foreign .safetensors file here, before diffusers takes it for a
    hub id and spends its retries on the network."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(
            f"{path} is not a readable .safetensors checkpoint ({exc})",
            hint="the file may be truncated: download or convert it again",
        ) from None


def check_model_source(model: str, *, unet: str | None = None, allow_pickle: bool = False) -> None:
    """Refuse a base model (and a swapped-in U-Net) that cannot load, reading no weights.

    What exists on disk is a path, never a hub id: a folder must be a pipeline, a file a
    checkpoint; pickled weights need ``allow_pickle``. Commands call it before they create
    outputs or start long work.
    """
    if "::" in model and unet is None:
        model, unet = split_base_unet(model)
    if model not in BUILTIN_MODELS and not is_architecture_name(model):
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
            if folder_has_only_pickled_weights(path) and not allow_pickle:
                raise UnsafeCheckpointError(
                    f"{path} holds only pickled weights (.bin), and loading a pickle can run arbitrary code",
                    hint="re-save it with safetensors, or pass --allow-pickle if you trust its source",
                )
        elif path.is_file():
            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                raise ModelLoadError(
                    f"{path} is not a checkpoint file", hint="expected " + ", ".join(SINGLE_FILE_SUFFIXES)
                )
            check_pickle(path, allow_pickle)
            if path.suffix.lower() == ".safetensors":
                _check_safetensors_file(path)
        elif not looks_like_hub_id(model):
            raise ModelLoadError(
                f"model '{model}' does not exist",
                hint="give a diffusers pipeline folder, a .safetensors file, a hub id (owner/name) or a built-in name: "
                + ", ".join(BUILTIN_MODELS),
            )
    if unet is not None and unet not in BUILTIN_MODELS:
        path = Path(unet).expanduser()
        if path.is_file():
            raise ModelLoadError(
                f"--unet {path} is a file",
                hint="give a U-Net folder in diffusers format (config.json + weights)",
            )
        if not path.is_dir() and not looks_like_hub_id(unet):
            raise ModelLoadError(
                f"U-Net '{unet}' does not exist", hint="give a U-Net folder, a pipeline folder or a hub id"
            )


def load_unet(source: str, *, allow_pickle: bool = False, torch_dtype=None):
    """Load a UNet2DConditionModel from a U-Net folder, a pipeline folder (its ``unet/``) or a hub id."""
    from diffusers import UNet2DConditionModel

    if source in BUILTIN_MODELS:
        source = str(builtin_folder(source))
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
        if folder_has_only_pickled_weights(target) and not allow_pickle:
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
    if looks_like_hub_id(source):
        try:
            return UNet2DConditionModel.from_pretrained(
                source, subfolder="unet", dtype=torch_dtype, use_safetensors=not allow_pickle
            )
        except Exception as exc:
            raise _hub_error(source, exc) from exc
    raise ModelLoadError(
        f"U-Net '{source}' does not exist", hint="give a U-Net folder, a pipeline folder or a hub id"
    )


def load_component(
    cls,
    source: str,
    subfolder: str | None = None,
    *,
    allow_pickle: bool = False,
    what: str = "model",
    **kwargs,
):
    """``cls.from_pretrained`` for one part of a model (U-Net, VAE, text encoder, tokenizer,
    scheduler), with the rules of every other loader here: what exists on disk is a path
    (a file is refused, never looked up on the hub), pickled weights need ``allow_pickle``,
    and a failure is one :class:`ModelLoadError` naming the part and the source.
    """
    import torch

    if source in BUILTIN_MODELS:
        source = str(builtin_folder(source))
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"{source} is a file, expected a pipeline folder",
                hint="give a diffusers pipeline folder (model_index.json, unet/, vae/, ...); "
                "`distilsd generate` also loads single-file checkpoints",
            )
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise ModelLoadError(
                f"cannot load the {what} of '{source}': it has no {subfolder}/ folder",
                hint="give a diffusers pipeline folder (model_index.json, unet/, vae/, ...)",
            )
        if folder_has_only_pickled_weights(folder) and not allow_pickle:
            raise UnsafeCheckpointError(
                f"the {what} in {folder} has only pickled weights (.bin), and loading a pickle can run arbitrary code",
                hint="re-save it with safetensors, or pass --allow-pickle (allow_pickle: true) if you trust its source",
            )
        location = str(path)
    elif looks_like_hub_id(source):
        location = source
    else:
        raise ModelLoadError(
            f"model '{source}' does not exist",
            hint="give a diffusers pipeline folder, a hub id (owner/name) or a built-in name: "
            + ", ".join(BUILTIN_MODELS),
        )
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        # None: safetensors when present, else the pickle that was allowed; True: only safetensors.
        kwargs["use_safetensors"] = None if allow_pickle else True
    if subfolder is not None:
        kwargs["subfolder"] = subfolder
    try:
        return cls.from_pretrained(location, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"cannot load the {what} of '{source}': {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}",
            hint="give a diffusers pipeline folder (model_index.json, unet/, vae/, ...)",
        ) from exc


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
    """A short name for image metadata and reports: the built-in name, the folder or file name, or the hub id."""
    if source in BUILTIN_MODELS:
        return source
    path = Path(source)
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return source  # hub id or architecture name


def pipeline_class(task: str):
    """The diffusers pipeline class that runs ``task`` (text2image, image2image, inpaint)."""
    import diffusers

    if task not in TASKS:
        raise InputError(f"unknown task '{task}'", hint="use one of: " + ", ".join(TASKS))
    return {
        "text2image": diffusers.StableDiffusionPipeline,
        "image2image": diffusers.StableDiffusionImg2ImgPipeline,
        "inpaint": diffusers.StableDiffusionInpaintPipeline,
    }[task]


def pipeline_for_task(pipe, task: str):
    """The same components under the diffusers pipeline class of ``task``."""
    cls = pipeline_class(task)
    return pipe if type(pipe) is cls else cls(**pipe.components)


def _local_folder(model: str) -> Path | None:
    """The local folder a model name stands for (built-in or path), None for hub ids."""
    if model in BUILTIN_MODELS:
        return builtin_folder(model)
    return Path(model) if Path(model).is_dir() else None


def load_torch_pipeline(
    model: str,
    *,
    unet: str | None = None,
    task: str = "text2image",
    dtype: str = "fp32",
    device: str = "auto",
    allow_pickle: bool = False,
    config: str | None = None,
    safety_checker: bool = True,
    vae: str | None = None,
) -> LoadedPipeline:
    """``model`` (optionally with another ``unet``) as a PyTorch diffusers pipeline for ``task``.

    ``vae`` swaps in a tiny VAE: a folder, or ``"tiny"`` for the model's own ``tiny_vae/``
    (random weights for an architecture name); see :mod:`distilsd.tiny_vae`.
    Architecture names give random weights. Options that only change how the pipeline runs
    (scheduler, slicing, memory format) are applied by :func:`distilsd.generate.load_pipeline`.
    """
    torch_device = resolve_device(device)
    dtype_ = resolve_dtype(dtype, torch_device)
    if is_architecture_name(model):
        if unet is not None:
            raise InputError("--unet cannot be combined with an architecture-only model")
        pipe = random_pipeline(model).to(dtype=dtype_)
    else:
        pipe = load_base_pipeline(model, allow_pickle=allow_pickle, config=config, torch_dtype=dtype_)
    if unet is not None:
        swapped = load_unet(unet, allow_pickle=allow_pickle, torch_dtype=dtype_)
        check_unet_fits(swapped, pipe.text_encoder)
        pipe.unet = swapped
        pipe.register_modules(unet=swapped)
    else:
        check_unet_fits(pipe.unet, pipe.text_encoder)
    vae_name = ""
    if vae is not None:
        from distilsd.tiny_vae import attach_tiny_vae

        vae_name = attach_tiny_vae(
            pipe, vae, model_folder=_local_folder(model), random_weights=is_architecture_name(model)
        )

    if not safety_checker and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
        pipe.register_to_config(requires_safety_checker=False)
        pipe.register_modules(safety_checker=None)
    pipe = pipeline_for_task(pipe, task).to(torch_device)
    return LoadedPipeline(
        pipeline=pipe,
        name=model_display_name(model)
        + (f"+unet:{model_display_name(unet)}" if unet else "")
        + (f"+vae:{vae_name}" if vae_name else ""),
        source=model,
        unet_source=unet,
        device=torch_device,
        dtype=dtype_,
    )
