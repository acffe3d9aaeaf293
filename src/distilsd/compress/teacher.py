"""Where a teacher comes from: an architecture preset, a pipeline folder, a U-Net folder or a hub id.

Configs are read first (cheap, no weights), so layouts and output folders are checked before
any weights are loaded. Weights are loaded from safetensors only, unless pickled checkpoints
are explicitly allowed.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distilsd.errors import InputError, ModelLoadError, UnsafeCheckpointError

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

PRESET_DIR = Path(__file__).parent / "presets"
ARCHITECTURE_PRESETS = ("sd-v1", "sd-v2")


@dataclass
class TeacherSource:
    """A teacher, resolved but not loaded.

    Attributes:
        name: what the user gave (preset name, folder or hub id).
        kind: ``"preset"`` (architecture only, no weights), ``"pipeline"`` (a diffusers
            pipeline folder), ``"unet"`` (a U-Net folder) or ``"hub"`` (a hub id).
        unet_config: the teacher U-Net's config.
        unet_dir: the folder holding the U-Net weights (pipeline/unet folders).
        pipeline_dir: the pipeline folder (pipeline teachers only).
        component_configs: configs of the text encoder and VAE where known (for parameter counts).
        description: one line for reports.
    """

    name: str
    kind: str
    unet_config: dict[str, Any]
    unet_dir: Path | None = None
    pipeline_dir: Path | None = None
    component_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""

    @property
    def has_weights(self) -> bool:
        return self.kind != "preset"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "description": self.description}


def load_preset(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8"))


def preset_scheduler(name: str = "sd-v1", **overrides: Any):
    """The scheduler an architecture preset ships with (PNDM with SD's betas), as a diffusers object."""
    from diffusers import PNDMScheduler

    config = {k: v for k, v in load_preset(name)["scheduler"].items() if not k.startswith("_")}
    config.update(overrides)
    return PNDMScheduler(**config)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def _check_unet_config(config: dict[str, Any], where: str) -> dict[str, Any]:
    class_name = config.get("_class_name")
    if class_name != "UNet2DConditionModel":
        raise InputError(
            f"{where} holds a {class_name or 'model without _class_name'}, not a UNet2DConditionModel",
            hint="the teacher must be an SD 1.x/2.x pipeline, its unet/ folder or hub id",
        )
    return config


def resolve_teacher(source: str | Path) -> TeacherSource:
    """Find the teacher's U-Net config (and component configs) without loading weights."""
    text = str(source)
    if text in ARCHITECTURE_PRESETS:
        preset = load_preset(text)
        return TeacherSource(
            name=text,
            kind="preset",
            unet_config=preset["unet"],
            component_configs={"text_encoder": preset["text_encoder"], "vae": preset["vae"]},
            description=f"{preset['description']}; shipped config, no weights",
        )

    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            index = _read_json(path / "model_index.json")
            if "unet" not in index or not (path / "unet" / "config.json").is_file():
                raise InputError(
                    f"the pipeline in {path} has no unet/ component",
                    hint="the teacher must be a UNet2DConditionModel (SD 1.x/2.x)",
                )
            config = _check_unet_config(_read_json(path / "unet" / "config.json"), f"{path / 'unet'}")
            components = {}
            for component in ("text_encoder", "vae"):
                component_config = path / component / "config.json"
                if component_config.is_file():
                    components[component] = _read_json(component_config)
            return TeacherSource(
                name=text,
                kind="pipeline",
                unet_config=config,
                unet_dir=path / "unet",
                pipeline_dir=path,
                component_configs=components,
                description=f"pipeline folder {path}",
            )
        if (path / "config.json").is_file():
            config = _check_unet_config(_read_json(path / "config.json"), str(path))
            return TeacherSource(
                name=text, kind="unet", unet_config=config, unet_dir=path, description=f"U-Net folder {path}"
            )
        raise InputError(
            f"{path} is neither a diffusers pipeline folder (model_index.json) nor a U-Net folder (config.json)"
        )
    if path.exists():
        raise InputError(f"{path} is a file; give a pipeline folder, a U-Net folder or a hub id")

    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and all(text.split("/"))
    if not looks_like_hub_id:
        raise InputError(
            f"teacher '{text}' not found",
            hint=f"give a pipeline folder, a U-Net folder, a hub id (org/name) or one of {', '.join(ARCHITECTURE_PRESETS)}",
        )
    return _resolve_hub_teacher(text)


def _resolve_hub_teacher(repo_id: str) -> TeacherSource:
    from diffusers import UNet2DConditionModel

    try:
        with warnings.catch_warnings():
            # diffusers' own hub calls warn about deprecated arguments: not the user's concern
            warnings.simplefilter("ignore")
            config = dict(UNet2DConditionModel.load_config(repo_id, subfolder="unet"))
    except Exception as exc:  # hub errors come in many types (offline, 404, gated)
        raise ModelLoadError(
            f"cannot read the U-Net config of hub model '{repo_id}': {str(exc).splitlines()[0]}",
            hint="check the id and your network, or give a local folder",
        ) from exc
    config.setdefault("_class_name", "UNet2DConditionModel")
    _check_unet_config(config, f"hub model {repo_id}")
    components = {}
    try:
        from huggingface_hub import hf_hub_download

        for component in ("text_encoder", "vae"):
            components[component] = _read_json(
                Path(hf_hub_download(repo_id, "config.json", subfolder=component))
            )
    except Exception:  # parameter counts of the other components are optional
        pass
    return TeacherSource(
        name=repo_id,
        kind="hub",
        unet_config=config,
        component_configs=components,
        description=f"hub model {repo_id}",
    )


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json"))


def check_weights_safe(folder: Path, allow_pickle: bool) -> None:
    """Refuse a folder whose weights are only pickled (.bin/.pt/.ckpt) unless allowed."""
    if _has_safetensors(folder):
        return
    pickled = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if not pickled:
        raise ModelLoadError(
            f"no weights found in {folder}", hint="expected diffusion_pytorch_model.safetensors"
        )
    if not allow_pickle:
        raise UnsafeCheckpointError(
            f"{folder} has only pickled weights ({', '.join(sorted(pickled))}), which can run code when loaded",
            hint="convert them to safetensors, or pass --allow-pickle if you trust the source",
        )


def load_teacher_unet(teacher: TeacherSource, allow_pickle: bool = False) -> UNet2DConditionModel:
    """Load the teacher U-Net's weights (safetensors only unless ``allow_pickle``)."""
    from diffusers import UNet2DConditionModel

    if not teacher.has_weights:
        raise InputError(
            f"'{teacher.name}' is an architecture preset without weights",
            hint="use --init random, --dry-run or `distilsd arch`, or give a real teacher folder or hub id",
        )
    # With allow_pickle, diffusers still prefers safetensors when both are present.
    use_safetensors = None if allow_pickle else True
    try:
        if teacher.kind == "hub":
            unet = UNet2DConditionModel.from_pretrained(
                teacher.name, subfolder="unet", use_safetensors=use_safetensors
            )
        else:
            check_weights_safe(teacher.unet_dir, allow_pickle)
            unet = UNet2DConditionModel.from_pretrained(teacher.unet_dir, use_safetensors=use_safetensors)
    except (InputError, ModelLoadError):
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the teacher U-Net from {teacher.name}: {str(exc).splitlines()[0]}",
            hint="pickled-only hub weights need --allow-pickle"
            if teacher.kind == "hub" and not allow_pickle
            else None,
        ) from exc
    unet.eval()
    return unet


def empty_unet(config: dict[str, Any]) -> UNet2DConditionModel:
    """A U-Net with the given config on the meta device: shapes and names, no memory."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config))
