"""Exporting an SD pipeline to OpenVINO IR or ONNX (``distilsd export``).

Each component is wrapped so that it has plain tensor inputs and one tensor output, traced
once with example inputs, and given static shapes (the U-Net's batch includes the
classifier-free guidance copy) unless ``dynamic``. The folder gets the components, the
source's component configs, the tokenizer and the scheduler config, and, written last and
atomically, ``distilsd-export.json``: a folder without it is an unfinished export and is
refused when loaded. Everything is built in a temporary folder next to the output and
renamed into place at the end, so an interrupted export leaves no half folder under the
output name.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distilsd import __version__
from distilsd.deploy.runtime import (
    FORMATS,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    PRECISIONS,
    auto_precision,
    import_openvino,
)
from distilsd.errors import InputError, MissingDependencyError, OutputError
from distilsd.models import is_architecture_name, load_torch_pipeline, model_display_name, normalize_precision

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


@dataclass
class ExportSettings:
    """What to export: format, precision and shapes (diffusers' names where they exist)."""

    format: str = "openvino"
    precision: str = "fp32"  # fp32 | bf16 | int8, or auto: bf16 where the CPU runs it natively, else fp32
    width: int | None = None  # None: the model's native size
    height: int | None = None
    batch_size: int = 1  # images per pipeline call
    guidance: bool = True  # the U-Net batch holds the classifier-free guidance copy (2 x batch)
    dynamic: bool = False  # dynamic batch and spatial dimensions instead of static shapes
    vae_encoder: bool = True  # for image-to-image and inpainting
    calibration_prompts: list[str] | None = None  # int8 only; default: DEFAULT_CALIBRATION_PROMPTS
    calibration_steps: int = 10  # int8 only: denoising steps per calibration prompt
    quick_calibration: bool = False  # int8 only: skip SmoothQuant and bias correction (faster, worse)
    # OpenVINO only: how the torch modules are read. "onnx": traced to ONNX first (TorchScript
    # exporter), then read by OpenVINO's C++ ONNX frontend: 3-5x faster than "pytorch"
    # (openvino.convert_model on the module, whose graph decoding runs in Python), same graph.
    openvino_frontend: str = "onnx"

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise InputError(
                f"unknown export format '{self.format}'", hint="use one of: " + ", ".join(FORMATS)
            )
        if str(self.precision).strip().lower() == "auto":
            self.precision = auto_precision(self.format)  # resolved here: the manifest says what was exported
        self.precision = normalize_precision(self.precision, PRECISIONS, "precision")
        if self.format == "onnx" and self.precision != "fp32":
            raise InputError(
                f"--precision {self.precision} is not available for ONNX exports (ONNX Runtime's CPU provider has no fast bf16 path here)",
                hint="use --format openvino for bf16 and int8",
            )
        for name, value in (("width", self.width), ("height", self.height)):
            if value is not None and (value % 8 or not 64 <= value <= 2048):
                raise InputError(f"--{name} {value} must be a multiple of 8 in 64..2048")
        if self.batch_size < 1:
            raise InputError(f"--batch {self.batch_size} must be >= 1")
        if self.openvino_frontend not in ("onnx", "pytorch"):
            raise InputError(
                f"unknown OpenVINO frontend '{self.openvino_frontend}'", hint="use onnx or pytorch"
            )
        if self.calibration_steps < 1:
            raise InputError("the number of calibration steps must be >= 1")


# --------------------------------------------------------------------------- plain-tensor wrappers


def _wrappers(pipe) -> dict[str, Any]:
    """torch modules with plain tensor inputs and one tensor output, one per component."""
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, text_encoder):
            super().__init__()
            self.text_encoder = text_encoder

        def forward(self, input_ids):  # [B, 77] int64 -> [B, 77, D]
            return self.text_encoder(input_ids, return_dict=False)[0]

    class UNet(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):  # [U, 4, h, w], [U] float, [U, 77, D]
            return self.unet(
                sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False
            )[0]

    class GuidanceEmbeddedUNet(UNet):
        """An LCM student's U-Net: the guidance scale goes in as an embedding, not as a CFG batch."""

        def forward(self, sample, timestep, encoder_hidden_states, timestep_cond):  # + [U, time_cond_proj_dim]
            return self.unet(
                sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
                return_dict=False,
            )[0]  # fmt: skip

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample):  # [B, 4, h, w] (already divided by scaling_factor) -> [B, 3, H, W]
            return self.vae.decode(latent_sample, return_dict=False)[0]

    class VaeEncoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, sample):  # [B, 3, H, W] -> moments [B, 2 * latent_channels, h, w] (mean, logvar)
            if is_tiny_vae(self.vae):
                # A tiny VAE's encoder gives the (already scaled) latents themselves: [B, C, h, w].
                return self.vae.encode(sample, return_dict=False)[0]
            moments = self.vae.encoder(sample)
            if self.vae.quant_conv is not None:
                moments = self.vae.quant_conv(moments)
            return moments

    return {
        "text_encoder": TextEncoder(pipe.text_encoder).eval(),
        "unet": (GuidanceEmbeddedUNet if guidance_embedded(pipe.unet) else UNet)(pipe.unet).eval(),
        "vae_decoder": VaeDecoder(pipe.vae).eval(),
        "vae_encoder": VaeEncoder(pipe.vae).eval(),
    }


def guidance_embedded(unet) -> bool:
    """Whether ``unet`` takes the guidance scale as an embedding (LCM students: ``time_cond_proj_dim``).

    diffusers' pipelines then run no classifier-free guidance batch, so neither does the export.
    """
    return unet.config.get("time_cond_proj_dim") is not None


def component_shapes(
    pipe, width: int, height: int, settings: ExportSettings
) -> dict[str, dict[str, list[int]]]:
    """Static input shapes of every component (name -> input -> shape)."""
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    h, w = height // scale, width // scale
    batch = settings.batch_size
    unet_batch = 2 * batch if settings.guidance and not guidance_embedded(pipe.unet) else batch
    cross = pipe.text_encoder.config.hidden_size
    latent_channels = pipe.vae.config.latent_channels
    # The tokenizer pads every prompt to its model_max_length: 77 for SD, fewer for a model
    # trained on short captions (the Shapes model), and the runtime feeds exactly that many.
    text_tokens = pipe.tokenizer.model_max_length
    unet_inputs = {
        "sample": [unet_batch, pipe.unet.config.in_channels, h, w],
        "timestep": [unet_batch],
        "encoder_hidden_states": [unet_batch, text_tokens, cross],
    }
    if guidance_embedded(pipe.unet):
        unet_inputs["timestep_cond"] = [unet_batch, pipe.unet.config.time_cond_proj_dim]
    return {
        "text_encoder": {"input_ids": [batch, text_tokens]},
        "unet": unet_inputs,
        "vae_decoder": {"latent_sample": [batch, latent_channels, h, w]},
        # diffusers' image-to-image encodes one image at a time (one generator each).
        "vae_encoder": {"sample": [1, 3, height, width]},
    }


# Dimensions left free by --dynamic: batch everywhere, height and width of images and latents.
DYNAMIC_AXES = {
    "text_encoder": {"input_ids": [0]},
    "unet": {"sample": [0, 2, 3], "timestep": [0], "encoder_hidden_states": [0], "timestep_cond": [0]},
    "vae_decoder": {"latent_sample": [0, 2, 3]},
    "vae_encoder": {"sample": [0, 2, 3]},
}


def _example_inputs(shapes: dict[str, list[int]]):
    import torch

    examples = []
    for name, shape in shapes.items():
        if name == "input_ids":
            examples.append(torch.randint(0, 1000, shape, dtype=torch.long))
        elif name == "timestep":
            examples.append(torch.full(shape, 500.0))
        else:
            examples.append(torch.randn(shape))
    return tuple(examples)


def _export_openvino(
    module,
    shapes: dict[str, list[int]],
    dynamic_axes: dict[str, list[int]] | None,
    path: Path,
    frontend: str = "onnx",
) -> None:
    import torch

    ov = import_openvino()
    if frontend == "onnx":
        onnx_folder = path.parent / ".onnx"
        onnx_folder.mkdir()
        _export_onnx(module, shapes, dynamic_axes, onnx_folder / "model.onnx")
        model = ov.convert_model(str(onnx_folder / "model.onnx"))
    else:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            model = ov.convert_model(module, example_input=_example_inputs(shapes))
    new_shapes = {}
    for port, (name, shape) in zip(model.inputs, shapes.items(), strict=True):
        port.get_tensor().set_names({name})
        free = (dynamic_axes or {}).get(name, [])
        new_shapes[port] = ov.PartialShape([-1 if axis in free else size for axis, size in enumerate(shape)])
    model.reshape(new_shapes)
    model.outputs[0].get_tensor().set_names({"output"})
    # Weights stay f32 on disk: bf16 is a compile-time choice, and fp16 storage would round them.
    ov.save_model(model, str(path), compress_to_fp16=False)
    del model
    if frontend == "onnx":
        shutil.rmtree(path.parent / ".onnx")


def _export_onnx(
    module, shapes: dict[str, list[int]], dynamic_axes: dict[str, list[int]] | None, path: Path
) -> None:
    import torch

    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise MissingDependencyError("onnx", "deploy", "ONNX export") from None
    axes = {name: {axis: f"{name}_{axis}" for axis in free} for name, free in (dynamic_axes or {}).items()}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript exporter: it traces these models in seconds, where the dynamo
        # exporter of torch 2.14 takes about 10x longer and needs onnxscript.
        torch.onnx.export(
            module, _example_inputs(shapes), str(path), input_names=list(shapes), output_names=["output"],
            dynamic_axes=axes or None, opset_version=17, dynamo=False,
        )  # fmt: skip


def _files_of(folder: Path, root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _versions(fmt: str, precision: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["torch", "diffusers", "transformers"]
    names += ["openvino"] if fmt == "openvino" else ["onnx", "onnxruntime"]
    if precision == "int8":
        names.append("nncf")
    versions = {"distilsd": __version__, "python": platform.python_version()}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _check_dependencies(settings: ExportSettings) -> None:
    if settings.format == "openvino":
        import_openvino()
        if settings.openvino_frontend == "onnx":
            try:
                import onnx  # noqa: F401
            except ImportError:
                raise MissingDependencyError("onnx", "deploy", "OpenVINO export through ONNX") from None
    else:
        for package in ("onnx", "onnxruntime"):
            try:
                __import__(package)
            except ImportError:
                raise MissingDependencyError(package, "deploy", "ONNX export") from None
    if settings.precision == "int8":
        try:
            import nncf  # noqa: F401
        except ImportError:
            raise MissingDependencyError("nncf", "deploy", "int8 quantization") from None


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- source models


def load_source_pipeline(
    model: str,
    unet: str | None = None,
    allow_pickle: bool = False,
    config: str | None = None,
    vae: str | None = None,
):
    """The fp32 CPU pipeline to export: a real model (as ``generate`` loads it) or an architecture name.

    ``vae`` swaps in a tiny VAE first (a folder, or ``"tiny"``), as ``generate --vae`` does.
    """
    return load_torch_pipeline(
        model,
        unet=unet,
        dtype="fp32",
        device="cpu",
        allow_pickle=allow_pickle,
        config=config,
        safety_checker=False,
        vae=vae,
    ).pipeline


def is_tiny_vae(vae) -> bool:
    """Whether ``vae`` is an ``AutoencoderTiny`` (TAESD architecture) rather than an ``AutoencoderKL``."""
    return type(vae).__name__ == "AutoencoderTiny"


# --------------------------------------------------------------------------- the export


def export_pipeline(
    pipe, output: str | Path, settings: ExportSettings, source: dict[str, Any], overwrite: bool = False
) -> Path:
    """Export a loaded fp32 diffusers pipeline into ``output``; returns the folder.

    ``source`` describes where the pipeline came from (at least ``name``); it goes into the
    manifest.
    """
    import torch

    settings.validate()
    _check_dependencies(settings)
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise OutputError(
            f"{output} already exists and is not empty", hint="choose another -o, or pass --overwrite"
        )
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {output.parent}: {exc.strerror or exc}") from None

    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    native = int(pipe.unet.config.sample_size) * scale
    width, height = settings.width or native, settings.height or native
    shapes = component_shapes(pipe, width, height, settings)
    names = [c for c in COMPONENTS if c != "vae_encoder" or settings.vae_encoder]
    started = time.perf_counter()

    tmp = output.with_name(f".{output.name}.export-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        pipe = pipe.to("cpu", torch.float32)
        wrappers = _wrappers(pipe)
        components: dict[str, Any] = {}
        for name in names:
            folder = tmp / name
            folder.mkdir()
            dynamic_axes = (
                {k: v for k, v in DYNAMIC_AXES[name].items() if k in shapes[name]} if settings.dynamic else None
            )
            if settings.format == "openvino":
                model_file = folder / "openvino_model.xml"
                _export_openvino(
                    wrappers[name], shapes[name], dynamic_axes, model_file, settings.openvino_frontend
                )
            else:
                model_file = folder / "model.onnx"
                _export_onnx(wrappers[name], shapes[name], dynamic_axes, model_file)
            components[name] = {
                "name": name,
                "model_file": str(model_file.relative_to(tmp)),
                "inputs": list(shapes[name]),
                "static_shapes": None if settings.dynamic else shapes[name],
            }
        del wrappers

        # What the diffusers pipeline needs besides the runtimes: configs, tokenizer, scheduler.
        pipe.text_encoder.config.save_pretrained(tmp / "text_encoder")
        # diffusers' own writer: it turns the paths a swapped-in U-Net's config holds into text.
        pipe.unet.save_config(tmp / "unet")
        pipe.vae.save_config(tmp / "vae")
        pipe.tokenizer.save_pretrained(tmp / "tokenizer")
        pipe.scheduler.save_config(tmp / "scheduler")

        calibration = None
        if settings.precision == "int8":
            from distilsd.deploy.quantize import quantize_export

            calibration = quantize_export(pipe, tmp, components, settings, width, height)

        for name, entry in components.items():
            entry["files"] = _files_of(tmp / name, tmp)
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "format": settings.format,
            "precision": settings.precision,
            "dynamic": settings.dynamic,
            "source": source,
            "shapes": {
                "width": width,
                "height": height,
                "batch_size": settings.batch_size,
                "unet_batch": shapes["unet"]["sample"][0],
                "guidance_batch": shapes["unet"]["sample"][0] != settings.batch_size,
                "guidance_embedded": guidance_embedded(pipe.unet),
                "latent_height": height // scale,
                "latent_width": width // scale,
                "vae_scale_factor": scale,
                "text_tokens": shapes["text_encoder"]["input_ids"][1],
            },  # fmt: skip
            "components": components,
            "calibration": calibration,
            "versions": _versions(settings.format, settings.precision),
            "export_seconds": round(time.perf_counter() - started, 2),
            # Peak resident memory of the exporting process (KiB on Linux), source model included.
            "export_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            * (1 if sys.platform == "darwin" else 1024),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomically(tmp / MANIFEST_NAME, manifest)  # last: marks the export complete
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output


def export_model(
    model: str,
    output: str | Path,
    settings: ExportSettings | None = None,
    *,
    unet: str | None = None,
    allow_pickle: bool = False,
    config: str | None = None,
    overwrite: bool = False,
    loras: list | tuple = (),
    vae: str | None = None,
) -> Path:
    """Load ``model`` (a pipeline folder, checkpoint, hub id, built-in name or architecture preset) and export it.

    ``loras`` (``"PATH[:SCALE]"``) are fused into the weights first: an export has fixed
    weights, and the OpenVINO / ONNX runtimes then run the personalised model as fast as the base.
    A LoRA run's token embeddings go in as ``generate --lora`` loads them: the added tokens
    (``hexagon``, ``hexagon_1``) are saved with the tokenizer and their rows with the exported
    text encoder, and diffusers' pipeline rewrites the word into them, so the export draws
    ``generate --lora``'s images.
    ``vae`` (a tiny VAE folder, or ``"tiny"``) is exported in place of the full VAE: its decoder
    and encoder become ``vae_decoder`` / ``vae_encoder`` (docs/fast.md).
    """
    settings = settings or ExportSettings()
    settings.validate()
    _check_dependencies(settings)  # before loading any weights
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise OutputError(
            f"{output} already exists and is not empty", hint="choose another -o, or pass --overwrite"
        )
    from distilsd.lora.embeddings import embedding_files
    from distilsd.lora.files import LoRASpec, apply_loras, parse_lora_spec

    lora_specs = [spec if isinstance(spec, LoRASpec) else parse_lora_spec(str(spec)) for spec in loras]
    pipe = load_source_pipeline(model, unet=unet, allow_pickle=allow_pickle, config=config, vae=vae)
    adapters = apply_loras(pipe, lora_specs, fuse=True, allow_pickle=allow_pickle)

    name = (
        model
        if is_architecture_name(model)
        else model_display_name(model) + (f"+unet:{model_display_name(unet)}" if unet else "")
    ) + "".join(f"+lora:{adapter}:{spec.scale:g}" for adapter, spec in zip(adapters, lora_specs))
    name += f"+vae:{vae}" if vae else ""
    resolved = str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else model
    source = {
        "model": model,
        "resolved": resolved,
        "unet": unet,
        "name": name,
        "random_weights": is_architecture_name(model),
        "loras": [f"{spec.path}:{spec.scale:g}" for spec in lora_specs],
        # The LoRA runs' trained words, which the exported tokenizer and text encoder now carry.
        "token_embeddings": [path.stem for spec in lora_specs for path in embedding_files(spec.path)],
        "vae": vae,  # None: the model's own VAE; else the tiny VAE exported in its place
    }
    return export_pipeline(pipe, output, settings, source, overwrite=overwrite)
