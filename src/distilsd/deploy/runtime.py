"""Running an exported folder: OpenVINO / ONNX Runtime components behind diffusers' module interface.

Each exported component (text encoder, U-Net, VAE decoder and encoder) is wrapped in an object
that offers exactly the surface a stock diffusers ``StableDiffusionPipeline`` uses:

- text encoder: ``text_encoder(input_ids, attention_mask=None)[0]``, ``.config``, ``.dtype``;
- U-Net: ``unet(sample, t, encoder_hidden_states=..., return_dict=False)[0]``, ``.config``
  (``in_channels``, ``sample_size``, ``time_cond_proj_dim``), ``.dtype``, ``.device``;
- VAE: ``vae.decode(z, return_dict=False, generator=...)[0]``, ``vae.encode(x).latent_dist``,
  ``.config`` (``scaling_factor``, ``block_out_channels``, ...), ``.dtype``.

The pipeline is then built from these with diffusers' own classes, so its denoising loop,
schedulers, guidance and post-processing are diffusers' code, not a copy of it. The
components are not ``torch.nn.Module``s, so the pipeline's execution device is the CPU.

Tensors cross the boundary as float32 on the CPU; the runtime computes in the precision the
export asks for (``INFERENCE_PRECISION_HINT`` for OpenVINO).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from distilsd.errors import InputError, MissingDependencyError, ModelLoadError
from distilsd.models import EXPORT_MANIFEST_NAME

logger = logging.getLogger(__name__)

MANIFEST_NAME = EXPORT_MANIFEST_NAME
MANIFEST_VERSION = 1
FORMATS = ("openvino", "onnx")
PRECISIONS = ("fp32", "bf16", "int8")  # of exports, in distilsd.models' vocabulary
# OpenVINO's own names for the runtime compute precision (its INFERENCE_PRECISION_HINT).
_OPENVINO_HINTS = {"fp32": "f32", "bf16": "bf16"}


def import_openvino(feature: str = "OpenVINO export and inference"):
    try:
        import openvino
    except ImportError:
        raise MissingDependencyError("openvino", "deploy", feature) from None
    return openvino


def import_onnxruntime(feature: str = "ONNX Runtime inference"):
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("onnxruntime", "deploy", feature) from None
    return onnxruntime


def cpu_supports_bf16() -> bool:
    """Whether OpenVINO can run bf16 natively on this CPU (AVX-512 BF16 or AMX)."""
    ov = import_openvino()
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def auto_precision(backend: str) -> str:
    """What ``--precision auto`` exports for ``backend`` on this CPU: bf16 where OpenVINO runs it
    natively (AVX-512 BF16 / AMX), else fp32.

    bf16 is the fastest precision that keeps the image (a 512 px bk-tiny U-Net step 3.5x faster
    than fp32 on a Xeon with AMX, docs/deploy.md); int8 is faster again there (1.2-1.4x per
    U-Net step) but changes the image visibly, so it stays a choice the user makes.
    """
    if backend != "openvino":
        return "fp32"  # ONNX Runtime's CPU provider has no fast bf16 or int8 path here
    return "bf16" if cpu_supports_bf16() else "fp32"


def resolve_inference_precision(precision: str, backend: str, warn: bool = True) -> str:
    """The runtime compute precision (fp32|bf16) for an export of ``precision``: bf16 falls back to fp32 where unsupported.

    int8 exports run their int8 ops in int8 and the rest in bf16 where the CPU has it.
    """
    if backend != "openvino":
        return "fp32"
    if precision in ("fp32", "f32"):
        return "fp32"
    if cpu_supports_bf16():
        return "bf16"
    if warn and precision == "bf16":
        logger.warning("this CPU has no bf16 support (OpenVINO reports no BF16 capability); running in fp32")
    return "fp32"


# --------------------------------------------------------------------------- manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an exported folder, after checking that every file it lists is complete.

    The manifest is written last, so a folder without it is an export that did not finish.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a folder")
    if not path.exists():
        raise ModelLoadError(
            f"{folder} has no {MANIFEST_NAME}: it is not an export, or its export did not finish",
            hint="export it again with: distilsd export --model MODEL --format openvino -o " + str(folder),
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}", hint="export the model again") from None
    if manifest.get("manifest_version") != MANIFEST_VERSION or manifest.get("format") not in FORMATS:
        raise ModelLoadError(
            f"{path} is not a distilsd export manifest of version {MANIFEST_VERSION}",
            hint="export the model again",
        )
    if manifest.get("precision") == "f32":  # written before distilsd said fp32 everywhere
        manifest["precision"] = "fp32"
    for name, entry in manifest["components"].items():
        for relative, size in entry["files"].items():
            file = folder / relative
            if not file.exists() or file.stat().st_size != size:
                raise ModelLoadError(
                    f"the export in {folder} is incomplete or damaged: {relative} ({name}) is missing or has another size than recorded",
                    hint="export the model again",
                )
    return manifest


def is_exported_folder(path: str | Path) -> bool:
    """True for a folder with an export manifest (complete or not is checked on loading)."""
    return (Path(path) / MANIFEST_NAME).exists()


def looks_like_export(path: str | Path) -> bool:
    """True for a folder with a manifest or exported U-Net files: an export, finished or not."""
    unet = Path(path) / "unet"
    return (
        is_exported_folder(path) or (unet / "openvino_model.xml").exists() or (unet / "model.onnx").exists()
    )


# --------------------------------------------------------------------------- one component


class ComponentRunner:
    """One exported model on OpenVINO or ONNX Runtime: numpy in, numpy out, any batch.

    A static export has a fixed batch; a call with another batch runs in chunks of that
    batch (the last one padded by repeating its final item), so, for example, a U-Net
    exported for guidance (batch 2) still runs a guidance-free call of batch 1.
    """

    def __init__(self, folder: Path, entry: dict[str, Any], backend: str, inference_precision: str) -> None:
        self.name = entry["name"]
        self.inputs: list[str] = list(entry["inputs"])
        self.static_shapes: dict[str, list[int]] | None = entry.get("static_shapes")
        model_file = folder / entry["model_file"]
        self.backend = backend
        if backend == "openvino":
            ov = import_openvino()
            core = ov.Core()
            self.compiled = core.compile_model(
                str(model_file), "CPU", {"INFERENCE_PRECISION_HINT": _OPENVINO_HINTS[inference_precision]}
            )
            self.request = self.compiled.create_infer_request()
        else:
            ort = import_onnxruntime()
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self.session = ort.InferenceSession(
                str(model_file), sess_options=options, providers=["CPUExecutionProvider"]
            )

    @property
    def static_batch(self) -> int | None:
        return self.static_shapes[self.inputs[0]][0] if self.static_shapes else None

    def check_spatial(self, name: str, shape: tuple[int, ...], what: str) -> None:
        """Refuse an input whose non-batch dimensions differ from the static export's."""
        if not self.static_shapes:
            return
        expected = self.static_shapes[name]
        if list(shape[1:]) != list(expected[1:]):
            raise InputError(
                f"this export has static shapes: its {self.name} takes {what} of shape {expected[1:]} (batch aside) but got {list(shape[1:])}",
                hint="generate at the size the folder was exported for (see its distilsd-export.json), "
                "re-export with --width/--height, or export with --dynamic",
            )

    def _run_once(self, feeds: dict[str, Any]) -> list[Any]:
        if self.backend == "openvino":
            results = self.request.infer(feeds)
            return [results[output] for output in self.compiled.outputs]
        return self.session.run(None, feeds)

    def __call__(self, **feeds: Any) -> Any:
        """Run on numpy arrays (first output returned); splits or pads the batch to the static one."""
        import numpy as np

        batch = feeds[self.inputs[0]].shape[0]
        size = self.static_batch or batch
        if size == batch:
            return self._run_once(feeds)[0]
        outputs = []
        for start in range(0, batch, size):
            chunk = {}
            for key, value in feeds.items():
                part = value[start : start + size]
                if part.shape[0] < size:  # pad the last chunk; its extra outputs are dropped
                    part = np.concatenate([part] + [part[-1:]] * (size - part.shape[0]))
                chunk[key] = np.ascontiguousarray(part)
            outputs.append(self._run_once(chunk)[0][: min(size, batch - start)])
        return np.concatenate(outputs)


def _to_numpy(tensor, dtype=None):
    import numpy as np

    array = (
        tensor.detach().cpu().float().numpy()
        if dtype is None
        else tensor.detach().cpu().numpy().astype(dtype)
    )
    return np.ascontiguousarray(array)


# --------------------------------------------------------------------------- diffusers stand-ins


class ExportedTextEncoder:
    """The CLIP text encoder as diffusers' pipelines call it; returns ``(last_hidden_state,)``."""

    def __init__(self, runner: ComponentRunner, config: Any) -> None:
        import torch

        self.runner = runner
        self.config = config  # transformers CLIPTextConfig
        self.dtype = torch.float32
        self.device = torch.device("cpu")

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=None, return_dict=None, **kwargs):
        import numpy as np
        import torch

        if output_hidden_states:
            # diffusers asks for all hidden states only for clip_skip; the export has the last one.
            raise InputError(
                "clip_skip is not supported by exported models (only the text encoder's last hidden state is exported)"
            )
        if attention_mask is not None:
            raise InputError("an attention mask for the text encoder is not supported by exported models")
        self.runner.check_spatial("input_ids", tuple(input_ids.shape), "token ids")
        hidden = self.runner(input_ids=_to_numpy(input_ids, np.int64))  # [B, 77, D]
        return (torch.from_numpy(hidden),)


class ExportedUNet:
    """The U-Net as diffusers' pipelines call it."""

    def __init__(self, runner: ComponentRunner, config: Any) -> None:
        import torch

        self.runner = runner
        self.config = (
            config  # diffusers FrozenDict of the source U-Net's config (sample_size = exported size)
        )
        self.dtype = torch.float32
        self.device = torch.device("cpu")

    def __call__(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        timestep_cond=None,
        cross_attention_kwargs=None,
        added_cond_kwargs=None,
        return_dict: bool = True,
        **kwargs,
    ):
        import numpy as np
        import torch
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        takes_cond = "timestep_cond" in self.runner.inputs  # an LCM student's guidance embedding
        if takes_cond and timestep_cond is None:
            raise InputError("this exported U-Net embeds the guidance scale and needs timestep_cond")
        unsupported = {
            "timestep_cond": None if takes_cond else timestep_cond,
            "cross_attention_kwargs": cross_attention_kwargs,
            "added_cond_kwargs": added_cond_kwargs,
        }
        unsupported.update({k: v for k, v in kwargs.items() if v is not None})
        named = [name for name, value in unsupported.items() if value]
        if named:
            raise InputError(
                f"exported U-Nets do not take {', '.join(named)} (LoRA scales and IP-Adapters are not exported; fuse LoRAs with export --lora)"
            )
        batch = sample.shape[0]
        self.runner.check_spatial("sample", tuple(sample.shape), "latents")
        # Timesteps go in as one float per item: schedulers give int or float, scalar or [B].
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(batch)
        inputs = {
            "sample": _to_numpy(sample),
            "timestep": _to_numpy(t, np.float32),
            "encoder_hidden_states": _to_numpy(encoder_hidden_states),
        }
        if takes_cond:
            inputs["timestep_cond"] = _to_numpy(timestep_cond.expand(batch, -1))
        noise = self.runner(**inputs)  # [B, 4, h, w]
        noise = torch.from_numpy(noise)
        return UNet2DConditionOutput(sample=noise) if return_dict else (noise,)


class ExportedVAE:
    """The VAE's ``decode`` (and ``encode``, for image-to-image) as diffusers' pipelines call them."""

    def __init__(self, decoder: ComponentRunner, encoder: ComponentRunner | None, config: Any) -> None:
        import torch

        self.decoder = decoder
        self.encoder = encoder
        self.config = config  # diffusers FrozenDict of the source VAE's config
        self.dtype = torch.float32
        self.device = torch.device("cpu")

    def decode(self, z, return_dict: bool = True, generator=None):
        import torch
        from diffusers.models.autoencoders.vae import DecoderOutput

        self.decoder.check_spatial("latent_sample", tuple(z.shape), "latents")
        image = torch.from_numpy(self.decoder(latent_sample=_to_numpy(z)))  # [B, 3, H, W] in [-1, 1]
        return DecoderOutput(sample=image) if return_dict else (image,)

    def encode(self, x, return_dict: bool = True):
        import torch
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if self.encoder is None:
            raise InputError(
                "this export has no VAE encoder, so it cannot do image-to-image",
                hint="export it again (the encoder is exported by default)",
            )
        self.encoder.check_spatial("sample", tuple(x.shape), "images")
        output = torch.from_numpy(self.encoder(sample=_to_numpy(x)))
        if self.config.get("_class_name") == "AutoencoderTiny":
            # A tiny VAE's encoder gives latents, not a distribution ([B, C, h, w]); diffusers'
            # pipelines read `.latents` from it as from AutoencoderTiny.encode.
            from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput

            return AutoencoderTinyOutput(latents=output) if return_dict else (output,)
        posterior = DiagonalGaussianDistribution(output)  # moments [B, 2 * latent_channels, h, w]
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)


# --------------------------------------------------------------------------- the pipeline


def _frozen_config(path: Path, overrides: dict[str, Any] | None = None):
    from diffusers.configuration_utils import FrozenDict

    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(overrides or {})
    return FrozenDict(config)


def exported_pipeline(
    folder: str | Path, task: str = "text2image", scheduler=None, inference_precision: str | None = None
):
    """A stock diffusers pipeline (text-to-image, image-to-image or inpainting) on an exported folder.

    It has the PyTorch pipeline's call signature (``prompt``, ``negative_prompt``,
    ``num_inference_steps``, ``guidance_scale``, ``generator``, ``height``, ``width``, ...).
    ``scheduler`` replaces the exported scheduler; ``inference_precision`` overrides the
    runtime precision (default: the export's, bf16 falling back to fp32 where unsupported).
    """
    from diffusers import schedulers as diffusers_schedulers
    from transformers import CLIPTextConfig, CLIPTokenizer

    from distilsd.models import pipeline_class

    folder = Path(folder)
    manifest = read_manifest(folder)
    backend = manifest["format"]
    if backend == "openvino":
        import_openvino()
    else:
        import_onnxruntime()
    precision = inference_precision or resolve_inference_precision(manifest["precision"], backend)
    components = manifest["components"]
    if task != "text2image" and "vae_encoder" not in components:
        raise InputError(
            f"the export in {folder} has no VAE encoder, so it cannot do {task}",
            hint="export it again (the encoder is exported by default)",
        )

    def runner(name: str) -> ComponentRunner:
        return ComponentRunner(folder, components[name], backend, precision)

    shapes = manifest["shapes"]
    unet_overrides = {}
    if not manifest["dynamic"] and shapes["latent_height"] == shapes["latent_width"]:
        unet_overrides["sample_size"] = shapes["latent_height"]  # the default size is the exported one
    text_encoder = ExportedTextEncoder(
        runner("text_encoder"), CLIPTextConfig.from_pretrained(folder / "text_encoder")
    )
    unet = ExportedUNet(runner("unet"), _frozen_config(folder / "unet" / "config.json", unet_overrides))
    vae = ExportedVAE(
        runner("vae_decoder"),
        runner("vae_encoder") if task != "text2image" and "vae_encoder" in components else None,
        _frozen_config(folder / "vae" / "config.json"),
    )
    if scheduler is None:
        scheduler_config = json.loads(
            (folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8")
        )
        scheduler = getattr(diffusers_schedulers, scheduler_config["_class_name"]).from_config(
            scheduler_config
        )
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    pipe = pipeline_class(task)(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.export_manifest = manifest
    pipe.inference_precision = precision
    return pipe


def load_exported_pipeline(
    folder: str | Path,
    *,
    task: str = "text2image",
    scheduler: str | None = None,
    width: int | None = None,
    height: int | None = None,
    inference_precision: str | None = None,
    source: str | None = None,
):
    """An exported folder as a :class:`distilsd.models.LoadedPipeline` for ``generate_images``.

    ``scheduler`` is a distilsd scheduler name (as ``generate --scheduler``). A static export
    asked for another ``width``/``height`` is refused (InputError naming both sizes and the
    fix): an explicit folder is never re-exported behind the user's back. ``source`` is the
    name recorded as the model (default: the folder).
    """
    import torch

    from distilsd.models import TASKS, LoadedPipeline
    from distilsd.schedulers import make_scheduler, scheduler_spec

    if task not in TASKS:
        raise InputError(f"unknown task '{task}'", hint="use one of: " + ", ".join(TASKS))
    if scheduler is not None:
        scheduler_spec(scheduler)
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_export_size(manifest, folder, width, height)
    pipe = exported_pipeline(folder, task=task, inference_precision=inference_precision)
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    label = f"{manifest['source']['name']}@{manifest['format']}-{manifest['precision']}"
    shapes = manifest["shapes"]
    return LoadedPipeline(
        pipeline=pipe, name=label, source=source or str(folder), unet_source=manifest["source"].get("unet"),
        device=torch.device("cpu"), dtype=torch.float32,
        static_size=None if manifest["dynamic"] else (shapes["width"], shapes["height"]),
    )  # fmt: skip


def check_export_size(manifest: dict[str, Any], folder: Path, width: int | None, height: int | None) -> None:
    """Refuse a static export asked for a size it was not exported at."""
    if manifest["dynamic"]:
        return
    shapes = manifest["shapes"]
    asked_w = width or shapes["width"]
    asked_h = height or shapes["height"]
    if (asked_w, asked_h) != (shapes["width"], shapes["height"]):
        raise InputError(
            f"{folder} was exported with static shapes for {shapes['width']}x{shapes['height']} px, not {asked_w}x{asked_h}",
            hint=f"drop --width/--height, re-export with --width {asked_w} --height {asked_h} (or --dynamic), "
            "or use --backend, which exports each size into its own cache entry",
        )
